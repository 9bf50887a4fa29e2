"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence): find, download, verify and parse.

The four standard idx files are looked for, in this order, in:

1. the ``path`` argument (if given, it must hold them: otherwise a DataError naming it);
2. ``$DIFFLAB_DATA`` and ``$DIFFLAB_DATA/fashion-mnist``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
4. ``../shared/data/fashion-mnist`` relative to the current directory, then relative to the
   source checkout this module lives in (the project's shared test data);
5. ``difflab.io.cache_dir("fashion-mnist")`` (where downloads go);

and otherwise downloaded from the upstream locations in the Fashion-MNIST README
(github.com/zalandoresearch/fashion-mnist, "Get the Data") into the cache, each file checked
against the MD5 published there. Each file may be gzipped (``*.gz``, as published) or plain.

The MD5s are those of the *published* ``.gz`` files. Re-packaged copies (Debian's, and the one
in ``../shared/data``) are re-compressed and have other MD5s, so files found locally are not
checked by MD5; every file, wherever it comes from, is checked by parsing: idx magic number,
dimensions, exact length, labels in 0..9 and image/label counts that agree.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from enum import Enum
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.errors import DataError, parse_choice
from difflab.io import atomic_path, cache_dir

__all__ = ["Split", "FILES", "MD5", "MIRRORS", "find_fashion_mnist", "download_fashion_mnist", "load_fashion_mnist"]


class Split(str, Enum):
    TRAIN = "train"
    TEST = "test"
    ALL = "all"


#: split part -> (images file, labels file), as published.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: MD5 of each published file, from the table in the upstream README.
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

#: Download locations, tried in order: the README's direct links (S3), then the GitHub copy.
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
NUM_CLASSES = 10
_TIMEOUT = 60.0
_BLOCK = 1 << 20


def _parts(split: Split) -> list[str]:
    return ["train", "test"] if split is Split.ALL else [split.value]


def _needed(split: Split) -> list[str]:
    return [name for part in _parts(split) for name in FILES[part]]


def _file_in(folder: Path, name: str) -> Path | None:
    """``folder/name`` or its gunzipped twin, whichever is a file."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _has_all(folder: Path, names: list[str]) -> bool:
    return all(_file_in(folder, n) is not None for n in names)


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/difflab/data/this.py -> checkout
    return root if (root / "pyproject.toml").is_file() else None


def _search_dirs() -> list[Path]:
    """Where to look when no path is given, in order (see the module docstring)."""
    dirs: list[Path] = []
    env = os.environ.get("DIFFLAB_DATA")
    if env:
        base = Path(env).expanduser()
        dirs += [base, base / "fashion-mnist"]
    dirs.append(DEBIAN_DIR)
    dirs.append(Path.cwd() / ".." / "shared" / "data" / "fashion-mnist")
    repo = _repo_root()
    if repo is not None:
        dirs.append(repo / ".." / "shared" / "data" / "fashion-mnist")
    dirs.append(cache_dir("fashion-mnist"))
    return dirs


def find_fashion_mnist(path: str | os.PathLike[str] | None = None, split: str | Split = "train",
                       *, download: bool = True, progress: bool = True) -> Path:
    """The folder holding the files ``split`` needs (downloading them if nowhere to be found)."""
    split = parse_choice(Split, split, "fashion-mnist split")
    names = _needed(split)
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataError(f"fashion-mnist folder {folder} does not exist")
        if not _has_all(folder, names):
            missing = [n for n in names if _file_in(folder, n) is None]
            raise DataError(f"fashion-mnist folder {folder} lacks {', '.join(missing)}")
        return folder
    for folder in _search_dirs():
        if _has_all(folder, names):
            return folder
    if not download:
        raise DataError("fashion-mnist not found: set $DIFFLAB_DATA to a folder holding "
                        + ", ".join(names))
    return download_fashion_mnist(split=split, progress=progress)


def _fetch(url: str, target: Path, md5: str, *, progress: bool) -> None:
    """Stream ``url`` to ``target`` atomically; DataError (and no file) unless its MD5 is ``md5``."""
    digest = hashlib.md5()
    with atomic_path(target) as tmp:
        with urlopen(url, timeout=_TIMEOUT) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
            total = int(length) if length and str(length).isdigit() else None
            with tqdm(total=total, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not progress, dynamic_ncols=True) as bar:
                while True:
                    block = response.read(_BLOCK)
                    if not block:
                        break
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
        got = digest.hexdigest()
        if got != md5:
            raise DataError(f"checksum mismatch for {url}: MD5 {got}, expected {md5}; file discarded")


def download_fashion_mnist(dest: str | os.PathLike[str] | None = None, split: str | Split = "all",
                           *, progress: bool = True) -> Path:
    """Download the files ``split`` needs into ``dest`` (default: the cache); return the folder.

    Files already present with the right MD5 are kept. Each file is tried from every mirror in
    :data:`MIRRORS`; a file is only ever renamed into place after its MD5 matched.
    """
    split = parse_choice(Split, split, "fashion-mnist split")
    folder = Path(dest).expanduser() if dest is not None else cache_dir("fashion-mnist")
    folder.mkdir(parents=True, exist_ok=True)
    for name in _needed(split):
        target = folder / name
        if target.is_file() and _md5(target) == MD5[name]:
            continue
        errors: list[str] = []
        for base in MIRRORS:
            url = base + name
            try:
                _fetch(url, target, MD5[name], progress=progress)
                break
            except DataError as e:
                errors.append(str(e))
            except (URLError, OSError, ValueError) as e:  # ValueError: a malformed response
                reason = getattr(e, "reason", None) or e
                errors.append(f"{url}: {reason}")
        else:
            raise DataError(
                f"could not download fashion-mnist file {name} into {folder} ({'; '.join(errors)}); "
                "without network, put the four idx files in a folder and set $DIFFLAB_DATA to it"
            )
    return folder


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with ``ndim`` dimensions (gzipped or not)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"fashion-mnist file {path} is corrupt or unreadable: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"fashion-mnist file {path} is too short to be an idx file")
    magic = int.from_bytes(raw[:4], "big")
    want = 0x0800 + ndim  # zero, zero, type 0x08 (unsigned byte), number of dimensions
    if magic != want:
        raise DataError(f"fashion-mnist file {path} has idx magic number {magic:#010x}, expected {want:#010x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"fashion-mnist file {path} holds {len(raw)} bytes, its header {dims} says {expected}")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def _read_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    img_name, lab_name = FILES[part]
    img_path, lab_path = _file_in(folder, img_name), _file_in(folder, lab_name)
    assert img_path is not None and lab_path is not None  # checked by find_fashion_mnist
    images = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"fashion-mnist file {img_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"fashion-mnist files {img_path} and {lab_path} disagree: {len(images)} images, {len(labels)} labels")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"fashion-mnist file {lab_path} has label {int(labels.max())}, expected 0..{NUM_CLASSES - 1}")
    return images, labels


def load_fashion_mnist(path: str | os.PathLike[str] | None = None, split: str | Split = "train",
                       *, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (uint8, N x 1 x 28 x 28) and labels (int64, N), in file order.

    ``split``: "train" (60,000), "test" (10,000) or "all" (train then test).
    """
    split = parse_choice(Split, split, "fashion-mnist split")
    folder = find_fashion_mnist(path, split, progress=progress)
    parts = [_read_part(folder, part) for part in _parts(split)]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return (torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))
