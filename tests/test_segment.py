"""Segmentation by diffusion (SegDiff; issue 23, part B): the segment config and the conditioning
modes, the one-hot encoding, the vote and the uncertainty, the plain segmenter's loss, exact resume,
`difflab train --task segment` and `difflab segment` end to end, and the acceptance test: a synthetic
task learnt in seconds to mIoU > 0.9 with the diffusion objective."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.cli import main
from difflab.config import RunConfig, SegmentConfig, resolve_config, to_dict
from difflab.data.paired import PairedData, read_mask, split_pairs
from difflab.edit.segment import ce_logits, ce_loss, entropy, onehot, segment_batches, to_mask, uncertainty_u8, vote
from difflab.errors import ConfigError, DataError, DifflabError
from difflab.metrics.segmentation import confusion, scores
from difflab.models.unet import CondMode, UNet, UNetConfig
from difflab.samplers import SamplerConfig
from difflab.train import Trainer
from difflab.train import checkpoint as ckpt_mod

CLASSES = ("background", "disc")


def discs(n, size=16, seed=0):
    """Bright discs of random radius and place on a dark, noisy ground; the mask is the disc (class 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    for k in range(n):
        r = rng.uniform(0.18, 0.35) * size
        cx, cy = rng.uniform(r, size - r, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img = rng.integers(0, 70, (size, size, 3))
        img[disc] = rng.integers(180, 256, (int(disc.sum()), 3))
        images[k], masks[k] = img, disc
    return images, masks


def paired_data(n=24, size=16, seed=0):
    images, masks = discs(n, size, seed)
    return PairedData(images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), masks=torch.from_numpy(masks),
                      classes=CLASSES, ids=tuple(f"p{k:03d}" for k in range(n)), source="synthetic discs", num_skipped=0)


def paired_folder(root, n=10, size=16, seed=0):
    images, masks = discs(n, size, seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("0 background\n1 disc\n")
    for k in range(n):
        Image.fromarray(images[k]).save(root / "images" / f"p{k:02d}.png")
        Image.fromarray(masks[k]).save(root / "masks" / f"p{k:02d}.png")
    return root


def seg_cfg(*overrides, source="synthetic"):
    return resolve_config(
        preset="tiny",
        flags={"data.source": source, "data.image_size": 16, "segment.classes": CLASSES},
        overrides=["train.batch_size=4", "train.max_steps=4", "train.sample_every=0", "train.checkpoint_every=2",
                   "train.log_every=2", "train.precision=fp32", "train.warmup_steps=2", "train.ema_halflife_images=40",
                   "model.dropout=0", *overrides],
    )


# -- config -----------------------------------------------------------------------------------
def test_segment_config_round_trips_and_is_checked(tmp_path):
    cfg = seg_cfg()
    assert cfg.segment.active and cfg.model.in_channels == 2 and cfg.model.cond_channels == 3
    assert cfg.model.cond_mode is CondMode.CONCAT  # SR3's concatenation stays the default
    assert cfg.loss.prediction.value == "v"  # a segmentation run's default; a given loss.prediction wins
    assert seg_cfg("loss.prediction=eps").loss.prediction.value == "eps"
    from_toml = resolve_config(preset="tiny", toml={"loss": {"prediction": "x0"}},
                               flags={"data.source": "x", "data.image_size": 16, "segment.classes": CLASSES})
    assert from_toml.loss.prediction.value == "x0"
    assert resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16}).loss.prediction.value == "eps"
    for c in (cfg, seg_cfg("model.cond_mode=add", "segment.objective=ce", "segment.hflip=true", "segment.crop=0.25",
                           "segment.val_fraction=0.2")):
        assert RunConfig.from_dict(json.loads(c.to_json())) == c
        (tmp_path / "config.json").write_text(c.to_json())
        assert RunConfig.load(tmp_path / "config.json") == c
    # a run saved before segmentation existed (no segment table, no model.cond_mode) loads unchanged
    plain = resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16})
    raw = to_dict(plain)
    del raw["segment"], raw["model"]["cond_mode"]
    assert RunConfig.from_dict(raw) == plain and not plain.segment.active and plain.model.cond_channels == 0
    bad = [
        (lambda: seg_cfg("segment.classes=a"), "2..64 classes"),
        (lambda: SegmentConfig(classes=("a", "a")), "names a class twice"),
        (lambda: SegmentConfig(hflip=True), "not a segmentation run"),
        (lambda: SegmentConfig(classes=CLASSES, crop=1.0), r"segment.crop must be a number in \[0, 1\)"),
        (lambda: SegmentConfig(classes=CLASSES, objective="dice"), "segment.objective"),
        (lambda: seg_cfg("data.augment.hflip=true"), "use segment.hflip and segment.crop"),
        (lambda: seg_cfg("model.in_channels=3"), "has 2 classes"),
        (lambda: resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16, "upscale.from_size": 8,
                                                      "segment.classes": CLASSES}), "cannot be combined with --task upscale"),
        (lambda: UNetConfig(image_size=16, cond_mode="add"), "cond_mode=add needs cond_channels > 0"),
    ]
    for make, message in bad:
        with pytest.raises(ConfigError, match=message):
            make()


SMALL = dict(image_size=16, in_channels=2, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
             attention_resolutions=(), head_channels=16, norm_groups=8, cond_channels=3)


@pytest.mark.parametrize("mode", ["concat", "add"])
def test_the_image_reaches_the_network_per_example(mode):
    torch.manual_seed(0)
    net = UNet(UNetConfig(**SMALL, cond_mode=mode)).eval()
    assert net.conv_in.in_channels == (5 if mode == "concat" else 2) and (net.cond_encoder is None) == (mode == "concat")
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a fresh network outputs zeros whatever it sees
    x = torch.randn(2, 2, 16, 16)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out_a = net(x, 10, lowres=a)
        assert not torch.allclose(out_a, net(x, 10, lowres=b), atol=1e-4)
        b[1] = a[1]
        out_b = net(x, 10, lowres=b)
        assert torch.allclose(out_b[1], out_a[1], atol=1e-6) and not torch.allclose(out_b[0], out_a[0], atol=1e-4)
        torch.testing.assert_close(net(x[:1], 10, lowres=a[:1]), out_a[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(DifflabError, match=r"needs lowres of shape \(2, 3, 16, 16\)"):
        net(x, 10)


# -- encoding, vote, uncertainty, the plain segmenter's loss ------------------------------------
def test_onehot_vote_and_uncertainty():
    mask = torch.tensor([[[0, 2], [1, 1]]], dtype=torch.uint8)
    x = onehot(mask, 3)
    assert x.shape == (1, 3, 2, 2) and set(x.unique().tolist()) == {-1.0, 1.0} and torch.equal(to_mask(x), mask)
    with pytest.raises(DataError, match="class index 3, outside 0..2"):
        onehot(torch.tensor([[[3]]]), 3)
    # votes of 4 samples at 3 pixels: a clear majority, a 2-2 tie (-> the lower class), all four different classes
    masks = torch.tensor([[0, 1, 0], [0, 2, 1], [1, 1, 2], [0, 2, 3]], dtype=torch.uint8)[:, None, :]
    ens, probs = vote(masks, 4)
    assert ens.tolist() == [[0, 1, 0]]
    torch.testing.assert_close(probs[:, 0, 0], torch.tensor([0.75, 0.25, 0, 0]))
    u = entropy(probs)[0]
    assert u[2] == pytest.approx(1.0) and u[1] == pytest.approx(0.5) and 0 < u[0] < 0.5
    assert uncertainty_u8(probs).tolist() == [[[round(255 * float(v)) for v in u]]]
    assert float(entropy(torch.tensor([1.0, 0.0])[:, None, None])) == 0.0


def test_the_plain_segmenter_is_one_pass_with_cross_entropy():
    seen = {}

    class Logits(torch.nn.Module):
        def forward(self, x, t, lowres=None):
            seen.update(x=x, t=t, lowres=lowres)
            return lowres[:, :2] * 3  # logits from the image

    image = torch.rand(3, 3, 4, 4) * 2 - 1
    mask = torch.randint(0, 2, (3, 4, 4))
    loss = ce_loss(Logits(), image, mask, 2)
    assert seen["x"].shape == (3, 2, 4, 4) and not seen["x"].any() and not seen["t"].any()
    assert torch.equal(seen["lowres"], image)
    want = F.cross_entropy(image[:, :2] * 3, mask, reduction="none").mean(dim=(1, 2))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(ce_logits(Logits(), image, 2), image[:, :2] * 3)


# -- training -------------------------------------------------------------------------------------
def _states(run_dir):
    return {name: ckpt_mod.load_tensors(run_dir / f"{name}.safetensors") for name in ("model", "ema")}


@pytest.mark.parametrize("extra", [["segment.hflip=true", "segment.crop=0.3", "model.cond_mode=add"],
                                   ["segment.objective=ce", "segment.hflip=true"]])
def test_resume_is_exact(tmp_path, extra):
    cfg, data = seg_cfg(*extra), paired_data()
    Trainer(cfg, tmp_path / "straight", data=data, progress=False).run()
    Trainer(cfg, tmp_path / "split", data=data, progress=False).run(stop_at=2)
    t = Trainer(cfg, tmp_path / "split", data=data, progress=False, resume=True)
    train_idx, val_idx = split_pairs(data, cfg.segment.val_fraction)
    assert len(t.data.images) == len(train_idx) and torch.equal(t.data.images, data.images[train_idx])
    assert torch.equal(t.seg.val_masks, data.masks[val_idx])  # the held-out pairs are never trained on
    t.run()
    a, b = _states(tmp_path / "straight"), _states(tmp_path / "split")
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    with pytest.raises(ConfigError, match="differ from the run's"):
        Trainer(seg_cfg(), tmp_path / "other", data=dataclasses.replace(data, classes=("a", "b")), progress=False)


def _miou(pred, truth):
    return scores(confusion(pred, truth, 2), CLASSES)["miou"]


def test_acceptance_discs_are_learnt_to_miou_above_0_9(tmp_path):
    """The issue's acceptance test: 16 px bright discs on a dark ground, 2 classes, a tiny UNet trained
    200 steps with the diffusion objective (the segmentation default, v-prediction); the held-out
    images' sampled masks (deterministic DDIM, 10 steps, one sample each) reach mIoU > 0.9 (measured:
    0.999 after 150 steps; 0.85 predicting eps, SEGMENT_PREDICTION)."""
    data = paired_data(n=64, seed=1)
    cfg = seg_cfg("train.max_steps=200", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=20",
                  "train.ema_halflife_images=1500", "train.checkpoint_every=1000", "train.log_every=100",
                  "segment.val_fraction=0.25")
    trainer = Trainer(cfg, tmp_path / "run", data=data, progress=False)
    trainer.run()
    seg = trainer.seg
    images = seg.val_images.float() / 127.5 - 1
    sampler = SamplerConfig(sampler="ddim", steps=10, eta=0.0)
    pred = to_mask(torch.cat([b for _, b in segment_batches(trainer.denoiser(), images, 2, sampler, seed=0,
                                                            progress=False)]))
    miou = _miou(pred, seg.val_masks)
    assert miou > 0.9, miou


# -- the commands -----------------------------------------------------------------------------------
TINY = ["--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--max-steps", "2", "--no-progress",
        "train.sample_every=2", "train.sample_grid_size=4", "train.precision=fp32"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return paired_folder(tmp_path_factory.mktemp("pairs") / "discs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder):
    root = tmp_path_factory.mktemp("seg-runs")
    assert main(["train", "--task", "segment", "--data", str(folder), "--out", str(root / "diff"), *TINY]) == 0
    assert main(["train", "--task", "segment", "--objective", "ce", "--data", str(folder), "--out", str(root / "ce"), *TINY]) == 0
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_and_segment_end_to_end(tmp_path, capsys, runs, folder):
    cfg = json.loads((runs / "diff" / "config.json").read_text())
    assert cfg["segment"]["classes"] == list(CLASSES) and cfg["model"]["in_channels"] == 2
    assert cfg["model"]["cond_channels"] == 3 and cfg["segment"]["objective"] == "diffusion"
    preview = Image.open(runs / "diff" / "samples" / "step-0000002.png")
    assert preview.size[0] > 3 * 16 and preview.mode == "RGB"  # rows image | truth | sample
    out = tmp_path / "masks"
    code, text, err = _run(capsys, "segment", "--run", runs / "diff", "--images", folder, "--out", out, "--samples", "3",
                           "--steps", "3", "--figure", tmp_path / "fig.png", "--truth", folder, "--no-progress")
    assert code == 0, err
    assert "paired folder: segmenting its images/" in text and "mIoU against --truth (10 masks)" in text
    ids = [f"p{k:02d}" for k in range(10)]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}{s}.png" for i in ids for s in ("", "_overlay", "_uncertainty"))
    mask = read_mask(out / "p00.png", 2)
    assert mask.shape == (16, 16) and Image.open(out / "p00_overlay.png").mode == "RGB"
    assert Image.open(out / "p00_uncertainty.png").mode == "L"
    assert Image.open(tmp_path / "fig.png").size[0] > 8 * 16
    record = json.loads((tmp_path / "masks.sampling.json").read_text())
    assert record["samples_per_image"] == 3 and record["classes"] == list(CLASSES) and "lowest class" in record["ensemble"]
    # sample k of image i has seed (seed, 3 i + k): the batch size changes nothing
    code, _, err = _run(capsys, "segment", "--run", runs / "diff", "--images", folder / "images", "--out", tmp_path / "b1",
                        "--samples", "3", "--steps", "3", "--batch-size", "2", "--no-progress")
    assert code == 0, err
    for i in ids:
        assert torch.equal(read_mask(tmp_path / "b1" / f"{i}.png"), read_mask(out / f"{i}.png"))
    code, text, err = _run(capsys, "eval-seg", "--pred", out, "--truth", folder)
    assert code == 0, err
    assert "mIoU" in text
    # square inputs of another size are answered at their own size, so eval-seg scores them against their masks
    big = paired_folder(tmp_path / "big", n=3, size=32)
    code, text, err = _run(capsys, "segment", "--run", runs / "diff", "--images", big, "--out", tmp_path / "big-out",
                           "--samples", "2", "--steps", "2", "--no-progress")
    assert code == 0, err
    assert "resized 3 of 3 input image(s)" in text and read_mask(tmp_path / "big-out" / "p00.png").shape == (32, 32)
    assert Image.open(tmp_path / "big-out" / "p00_uncertainty.png").size == (32, 32)
    code, text, err = _run(capsys, "eval-seg", "--pred", tmp_path / "big-out", "--truth", big)
    assert code == 0 and "mIoU" in text, err


def test_a_plain_segmenter_run_makes_one_mask_and_its_softmax_uncertainty(tmp_path, capsys, runs, folder):
    cfg = json.loads((runs / "ce" / "config.json").read_text())
    assert cfg["segment"]["objective"] == "ce"
    code, text, err = _run(capsys, "segment", "--run", runs / "ce", "--images", folder / "images", "--out", tmp_path / "o",
                           "--samples", "4", "--figure", tmp_path / "fig.png", "--no-progress")
    assert code == 0, err
    assert "--samples ignored" in text
    assert len(list((tmp_path / "o").glob("*_uncertainty.png"))) == 10 and (tmp_path / "fig.png").is_file()


def test_wrong_runs_and_inputs_are_one_line_errors(tmp_path, capsys, runs, folder):
    assert main(["train", "--data", str(folder / "images"), "--out", str(tmp_path / "gen"), *TINY]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    cases = [
        (["sample", "--run", runs / "diff"], "is a segmentation run (2 classes)"),
        (["segment", "--run", tmp_path / "gen", "--images", folder, "--out", tmp_path / "x"], "is not a segmentation run"),
        (["segment", "--run", runs / "diff", "--images", tmp_path / "empty", "--out", tmp_path / "x"], "holds no images"),
        (["segment", "--run", runs / "diff", "--images", folder, "--figure", tmp_path / "f.jpg"], "must end in .png"),
        (["train", "--task", "segment", "--data", folder / "images", "--out", tmp_path / "y"], "is not a paired folder"),
        (["train", "--objective", "ce", "--data", folder, "--out", tmp_path / "y"], "--objective is for --task segment"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, *argv, "--no-progress")
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
