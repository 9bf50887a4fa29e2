"""Conditional training and sampling end to end on tiny runs: class labels, attribute tags and captions,
guidance from the CLI, the names stored with the run, and bad label input as one-line errors."""
import json

import pytest
import torch
from PIL import Image

from difflab.cli import main

TINY = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--max-steps", "3", "--no-progress",
        "train.sample_every=3", "train.sample_grid_size=4", "train.precision=fp32"]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """12 images in two class folders, and a tags CSV over the same files (hair x eyes)."""
    root = tmp_path_factory.mktemp("tagged")
    g = torch.Generator().manual_seed(0)
    rows = ["file,hair,eyes"]
    for k in range(12):
        cls = "cats" if k % 2 else "dogs"
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(root / cls / f"{k}.png")
        rows.append(f"{cls}/{k}.png,{['blue', 'red', 'green'][k % 3]},{['brown', 'black'][k // 6]}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    return root


def _config(run):
    return json.loads((run / "config.json").read_text())


def _sample(capsys, run, *flags):
    assert main(["sample", "--run", str(run), "--steps", "3", "--no-progress", *map(str, flags)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(open(out.split("record: ")[1].split(";")[0].strip()).read())


def test_class_folders_train_and_sample_by_name(tmp_path, capsys, tagged):
    run = tmp_path / "r"
    assert main(["train", "--data", str(tagged), "--labels", "folders", "--out", str(run), *TINY]) == 0
    cfg = _config(run)
    assert cfg["cond"]["attributes"] == ["class"] and cfg["cond"]["classes"] == [["cats", "dogs"]]
    assert cfg["model"]["label_sizes"] == [2]
    rec = _sample(capsys, run, "--class", "dogs,cats", "-n", 3, "--guidance", 3, "--out", tmp_path / "s",
                  "--grid", tmp_path / "g.png")
    assert rec["n"] == 6 and rec["guidance"] == 3.0
    assert [c["condition"] for c in rec["conditions"]] == ["dogs", "cats"]
    assert [c["images"] for c in rec["conditions"]] == [[1, 3], [4, 6]]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"{k}.jpg" for k in range(1, 7)]
    with Image.open(tmp_path / "g.png") as grid:  # one row per class, 3 images each
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)
    _sample(capsys, run, "--class", "dogs", "-n", 9, "--out", tmp_path / "d", "--grid", tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as grid:  # one class: the first images as a square, not one row of 8
        assert grid.size == (3 * 18 + 2, 3 * 18 + 2)


def test_attribute_tags_and_partial_labels(tmp_path, capsys, tagged):
    run = tmp_path / "r"
    assert main(["train", "--data", str(tagged), "--labels", str(tagged / "tags.csv"), "--out", str(run), *TINY]) == 0
    cfg = _config(run)
    assert cfg["cond"]["attributes"] == ["hair", "eyes"] and cfg["model"]["label_sizes"] == [3, 2]
    rec = _sample(capsys, run, "--label", "hair=red,eyes=black", "--label", "hair=green", "-n", 2, "--out", tmp_path / "s")
    assert [c["labels"] for c in rec["conditions"]] == [{"hair": "red", "eyes": "black"}, {"hair": "green", "eyes": None}]


def test_captions_train_and_any_prompt_samples(tmp_path, capsys, tagged):
    pytest.importorskip("sentence_transformers", reason="the [text] extra")
    run = tmp_path / "r"
    assert main(["train", "--data", str(tagged), "--labels", str(tagged / "tags.csv"), "--captions", "--out", str(run),
                 *TINY, "cond.text_mode=both"]) == 0
    cfg = _config(run)
    assert cfg["cond"]["captions"] and cfg["model"]["text_dim"] == 384 and cfg["model"]["cross_attention_resolutions"] == [16, 8]
    rec = _sample(capsys, run, "--prompt", "a girl with blue hair and brown eyes", "--prompt", "green hair", "-n", 2,
                  "--guidance", 2, "--out", tmp_path / "s")
    assert [c["prompt"] for c in rec["conditions"]] == ["a girl with blue hair and brown eyes", "green hair"]
    rec = _sample(capsys, run, "--label", "hair=blue", "-n", 1, "--out", tmp_path / "s2")  # labels become a caption
    assert rec["conditions"][0]["labels"] == {"hair": "blue", "eyes": None}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tagged):
    run = tmp_path_factory.mktemp("plain") / "r"
    assert main(["train", "--data", str(tagged), "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, tagged):
    run = tmp_path_factory.mktemp("classes") / "r"
    assert main(["train", "--data", str(tagged), "--labels", "folders", "--out", str(run), *TINY]) == 0
    return run


@pytest.mark.parametrize("argv, message", [
    (["sample", "--run", "{plain}", "--class", "cats"], "trained without labels"),
    (["sample", "--run", "{classes}", "--class", "horse"], "--class 'horse': unknown class 'horse'; choose one of cats, dogs"),
    (["sample", "--run", "{classes}", "--label", "fur=red"], "unknown label attribute 'fur'"),
    (["sample", "--run", "{classes}", "--prompt", "a cat"], "not trained on captions"),
    (["sample", "--run", "{classes}", "--class", "cats", "--guidance", "-1"], "--guidance"),
    (["sample", "--run", "{classes}", "--class", "cats", "--guidance-interval", "5,1"], "LO < HI"),
    (["sample", "--run", "{classes}", "--class", "cats", "--start", "4"], "--start"),
    (["train", "--data", "{data}", "--captions", "--out", "{tmp}/x"], "--captions builds captions from labels"),
    (["train", "--data", "{data}", "--labels", "classes", "--out", "{tmp}/x"], "--labels classes names a built-in"),
    (["train", "--data", "fashion-mnist", "--labels", "folders", "--out", "{tmp}/x"], "needs a folder"),
    (["train", "--data", "{data}", "--labels", "tags.txt", "--out", "{tmp}/x"], "--labels must be classes, folders or a .csv"),
    (["train", "--data", "{data}", "--labels", "{tmp}/missing.csv", "--out", "{tmp}/x"], "missing.csv"),
])
def test_bad_conditioning_input_is_one_line(tmp_path, capsys, tagged, plain_run, class_run, argv, message):
    fmt = dict(plain=plain_run, classes=class_run, data=tagged, tmp=tmp_path)
    argv = [a.format(**fmt) for a in argv]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("difflab: error:") and message.format(**fmt) in err[0], err


def test_conditional_training_is_reproducible_and_drops_conditions(tmp_path, tagged):
    """The same seed gives the same weights (condition dropout draws from the training generator);
    another cond_dropout gives other weights."""
    from difflab.train.checkpoint import load_tensors

    def train(name, *extra):
        run = tmp_path / name
        assert main(["train", "--data", str(tagged), "--labels", "folders", "--out", str(run), *TINY,
                     "train.sample_every=0", *extra]) == 0
        return load_tensors(run / "model.safetensors")

    a, b, c = train("a"), train("b"), train("c", "train.cond_dropout=0.5")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_eval_accuracy_and_compare_guidance_sweep(tmp_path, capsys, class_run, monkeypatch):
    """`eval --metrics accuracy --run` judges each image against the label its record asked for (a
    classifier trained on the run's own labelled data); `compare --guidance 0,2` sweeps w."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    _sample(capsys, class_run, "--class", "all", "-n", 3, "--out", tmp_path / "s")
    out = tmp_path / "scores.json"
    assert main(["eval", "--fake", str(tmp_path / "s"), "--metrics", "accuracy", "--run", str(class_run),
                 "--json", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert set(r["accuracy"]) == {"class", "all"} and 0 <= r["accuracy"]["class"] <= 1
    assert r["classifier"]["cached"] is False and "accuracy (class)" in printed
    assert main(["eval", "--fake", str(tmp_path / "s"), "--metrics", "accuracy", "--run", str(class_run),
                 "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["classifier"]["cached"] is True  # trained once
    assert main(["eval", "--fake", str(tmp_path / "s"), "--metrics", "accuracy", "--no-progress"]) == 2
    assert "--run is required for accuracy" in capsys.readouterr().err

    cmp = tmp_path / "cmp"
    assert main(["compare", "--run", str(class_run), "--samplers", "ddim-3", "--class", "all", "-n", "2",
                 "--guidance", "0,2", "--out", str(cmp), "--no-progress"]) == 0, capsys.readouterr().err
    result = json.loads((cmp / "compare.json").read_text())
    assert [(row["sampler"], row["guidance"]) for row in result["rows"]] == [("ddim-3-w0", 0.0), ("ddim-3-w2", 2.0)]
    assert [row["nfe"] for row in result["rows"]] == [3, 6]  # w = 0: one pass; w = 2: the batch doubled
    assert all(row["accuracy"] is not None for row in result["rows"]) and (cmp / "guidance.png").is_file()
    assert "guidance" in (cmp / "compare.md").read_text().splitlines()[0]
    assert json.loads((cmp / "ddim-3-w2.sampling.json").read_text())["conditions"][1]["condition"] == "dogs"


def test_captions_from_templates_name_attributes():
    """Templates use {list}/{and}/{and_reversed} or an attribute by name; a template naming an
    attribute the row leaves out falls back to {list}; anything else is a one-line ConfigError."""
    from difflab.captions import caption
    from difflab.data.labels import LabelSchema
    from difflab.errors import ConfigError

    schema = LabelSchema(("hair", "eyes"), (("blue", "red"), ("green", "red")))
    both, hair_only = [1, 0], [0, -1]
    assert caption(schema, both, "{list}") == "red hair, green eyes"
    assert caption(schema, both, "a girl with {and}") == "a girl with red hair and green eyes"
    assert caption(schema, both, "{and_reversed}") == "green eyes and red hair"
    assert caption(schema, both, "{hair}-haired girl with {eyes} eyes") == "red-haired girl with green eyes"
    assert caption(schema, hair_only, "{hair}-haired girl with {eyes} eyes") == "blue hair"
    assert caption(schema, hair_only, "hair: {hair}") == "hair: blue"
    assert caption(schema, [-1, -1], "{list}") == ""
    with pytest.raises(ConfigError, match=r"caption template '\{colour\} hair'.*\{hair\}, \{eyes\}"):
        caption(schema, both, "{colour} hair")
    one = LabelSchema(("class",), (("Trouser", "Bag"),))
    assert caption(one, [1], "a photo of a {list}") == "a photo of a Bag" == caption(one, [1], "a photo of a {class}")


def test_the_shipped_anime_caption_grammar_loads_and_keeps_the_benchmark_prompts_held_out():
    """configs/anime-tags-captions.toml (the grammar of BENCHMARKS.md's tags-grammar run) resolves into a
    run config, renders every template for the anime-tagged attributes, and none of its captions is one of
    the sentences bench/text_tags.py scores with (both held-out sets), for any pair of values."""
    import ast
    from pathlib import Path

    from difflab.captions import caption
    from difflab.config import load_toml, resolve_config
    from difflab.data.labels import LabelSchema

    root = Path(__file__).resolve().parents[1]
    cfg = resolve_config(preset="small", toml=load_toml(str(root / "configs" / "anime-tags-captions.toml")),
                         flags={"data.source": "faces", "data.image_size": 32})
    assert len(cfg.cond.templates) == 20 and cfg.cond.caption_variants == 3 and cfg.cond.text_noise == 0.2
    tree = ast.parse((root / "bench" / "text_tags.py").read_text())
    scored = [s for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id in ("HELD_OUT", "FRESH")
              for s in ast.literal_eval(node.value)]
    assert len(scored) == 8
    schema = LabelSchema(("hair", "eyes"), (("aqua", "blonde", "pink"), ("red", "green")))
    for row in ([0, 1], [1, 0], [2, 1]):
        captions = {caption(schema, row, t) for t in cfg.cond.templates}
        asked = {s.format(hair=schema.classes[0][row[0]], eyes=schema.classes[1][row[1]]) for s in scored}
        assert len(captions) == 20 and not captions & asked


def test_template_variants_only_insert_filler_words():
    """Each variant is its template with one to three vocabulary words inserted (fields kept whole),
    reproducible from the seed; ``accept`` filters; no vocabulary is a one-line error."""
    from difflab.captions import filler_vocabulary, template_variants
    from difflab.data.labels import LabelSchema
    from difflab.errors import ConfigError

    vocab = ["alpha", "beta", "gamma", "delta"]
    templates = ("a girl with {and}", "{list}")
    out = template_variants(templates, 4, vocab, seed=3)
    assert out[:2] == list(templates) and len(out) == 10 and len(set(out)) == 10
    for k, variant in enumerate(out[2:]):
        words = variant.split(" ")
        kept = [w for w in words if w not in vocab]
        assert " ".join(kept) == templates[k // 4]  # the template's words, in order, fields whole
        assert 1 <= len(words) - len(kept) <= 3
    assert template_variants(templates, 4, vocab, seed=3) == out
    assert template_variants(templates, 4, vocab, seed=4) != out
    short = template_variants(templates, 4, vocab, accept=lambda t: len(t.split(" ")) <= 2)
    assert short[:2] == list(templates) and all(len(t.split(" ")) <= 2 for t in short[2:])
    assert sum(t.count("{list}") for t in short[2:]) == 4 and "{and}" not in "".join(short[2:])  # 4 words + filler > 2
    with pytest.raises(ConfigError, match="no usable filler words"):
        template_variants(templates, 1, [])
    schema = LabelSchema(("hair", "eyes"), (("blue", "red"), ("green", "red")))
    assert filler_vocabulary(["blue", "Hair", "##ing", "ok", "zebra", "naïve", "walked", "Eyes", "x1y"], schema) == ["walked", "zebra"]


def test_text_noise_leaves_null_conditions_exact():
    """Conditioning augmentation moves given text vectors by ``scale`` x their RMS and nothing else:
    null rows (the unconditional half of guidance) and masked-out token slots are unchanged."""
    from difflab.train.conditions import add_text_noise

    g = torch.Generator().manual_seed(0)
    text = torch.randn(400, 384, generator=g) * 0.05
    text[::4] = 0  # dropped conditions
    tokens = torch.randn(400, 6, 384, generator=g) * 0.7
    mask = torch.arange(6)[None].expand(400, 6) < torch.randint(0, 7, (400, 1), generator=g)
    tokens[~mask] = 0
    cond = {"text": text, "text_tokens": tokens, "text_mask": mask}
    out = add_text_noise(cond, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(out["text"][::4], text[::4]) and torch.equal(out["text_tokens"][~mask], tokens[~mask])
    assert torch.equal(out["text_mask"], mask)
    given = (text != 0).any(-1)
    rel = (out["text"] - text)[given] / text[given].pow(2).mean(-1, keepdim=True).sqrt()
    assert abs(rel.std().item() - 0.2) < 0.01 and abs(rel.mean().item()) < 0.01
    rel_t = (out["text_tokens"] - tokens)[mask] / tokens[mask].pow(2).mean(-1, keepdim=True).sqrt()
    assert abs(rel_t.std().item() - 0.2) < 0.01
    again = add_text_noise(cond, 0.2, torch.Generator().manual_seed(1))
    assert all(torch.equal(again[k], out[k]) for k in out)


@pytest.mark.parametrize("field,value,message", [
    ("caption_variants", -1, "cond.caption_variants must be an integer >= 0"),
    ("caption_variants", 1.5, "cond.caption_variants must be an integer >= 0"),
    ("text_noise", -0.1, r"cond.text_noise must be a number in \[0, 10\)"),
    ("text_noise", True, r"cond.text_noise must be a number in \[0, 10\)"),
])
def test_text_augmentation_options_are_checked(field, value, message):
    from difflab.conditioning import CondConfig
    from difflab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        CondConfig(**{field: value})


def test_explicit_fields_give_the_same_captions_with_room_between_value_and_name():
    from difflab.captions import caption, explicit_fields, template_variants
    from difflab.data.labels import LabelSchema

    schema = LabelSchema(("hair", "eyes"), (("blue", "red"), ("green", "red")))
    for t in ("{list}", "a girl with {and}", "{and_reversed}", "anime, {list}!"):
        e = explicit_fields(t, schema)
        assert "{list}" not in e and "{and" not in e
        for row in ([0, 1], [1, 0]):
            assert caption(schema, row, e) == caption(schema, row, t), (t, row)
        for row in ([0, -1], [-1, 1]):  # an attribute dropped: like every template naming attributes, {list}
            assert caption(schema, row, e) == caption(schema, row, "{list}")
    assert explicit_fields("{list}", schema) == "{hair} hair, {eyes} eyes"
    one = LabelSchema(("class",), (("Bag", "Coat"),))
    assert explicit_fields("a {list}", one) == "a {list}"
    variants = template_variants([explicit_fields("{and}", schema)], 30, ["zz"], seed=0)
    assert any("{hair} zz hair" in v or "{eyes} zz eyes" in v for v in variants)  # a word between value and name
