"""Image folders on disk -> uint8 tensors: finding files, decoding a folder (in a process pool
for large ones) and caching the result.

Single files are decoded and resized by :mod:`difflab.data.decode`, whose module docstring
states the decoding rules; :func:`load_folder` follows them exactly, adding only JPEG draft
decoding (DCT scaling) for files at least 4x the target size (see there).
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import hashlib
import json
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from tqdm.auto import tqdm

from difflab.data.decode import BadImageError, _check_channels, _check_size, _decode, _resize_box, _shown
from difflab.errors import ConfigError, DataError, DifflabWarning
from difflab.io import atomic_path, atomic_write_json, cache_dir

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderImages",
    "SkippedImagesWarning",
    "find_images",
    "load_folder",
    "warn_skipped",
]

#: File suffixes (lower case, with the dot, as ``Path.suffix`` gives them) that count as images.
#: Compare with ``path.suffix.lower() in IMAGE_EXTENSIONS``.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

#: Bump when decoding or resizing changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 1

#: How many skipped files a warning names before it just counts.
_WARN_NAMES = 5

#: Folders with fewer images than this are decoded in-process (a pool costs more than it saves).
_POOL_MIN_IMAGES = 512


class SkippedImagesWarning(DifflabWarning):
    """Some files in an image folder could not be decoded and were left out."""


# --------------------------------------------------------------------------------------------
# finding files


def _find(root: Path) -> list[tuple[str, str]]:
    """(path relative to root with "/" separators, full path) of every image file, sorted.

    Plain strings, not Paths: this runs for every file of a folder on every (cached) load.
    """
    if not root.exists():
        raise DataError(f"image folder {_shown(root)} does not exist")
    if not root.is_dir():
        raise DataError(f"{_shown(root)} is not a folder of images")
    top = os.fspath(root)
    found: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, top)
        prefix = "" if rel_dir == os.curdir else rel_dir.replace(os.sep, "/") + "/"
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            found.append((prefix + name, os.path.join(dirpath, name)))
    found.sort(key=lambda item: item[0])
    return found


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root``, recursively, sorted by their path relative to ``root``.

    Only files whose suffix is in :data:`IMAGE_EXTENSIONS` (any case) count. Hidden files and
    folders (name starting with ``.``, e.g. macOS ``._x.jpg`` or ``.ipynb_checkpoints``) are
    ignored. Symlinked folders are followed, each real folder at most once. DataError if
    ``root`` is missing or not a folder.
    """
    return [Path(path) for _, path in _find(Path(root).expanduser())]


# --------------------------------------------------------------------------------------------
# decoding a folder's files (the unit of work of the process pool)


def _load_array(path: str, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 array C x H x W (the unit of work of :func:`load_folder`)."""
    img, content = _decode(path, channels, image_size)
    img = _resize_box(img, image_size, content)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_chunk(paths: list[str], image_size: int, channels: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode several files; failures are returned as (index in chunk, reason), not raised."""
    out = np.zeros((len(paths), channels, image_size, image_size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            out[i] = _load_array(p, image_size, channels)
        except BadImageError as e:
            reason = str(e)
            prefix = f"{_shown(p)}: "
            bad.append((i, reason[len(prefix):] if reason.startswith(prefix) else reason))
    return out, bad


# --------------------------------------------------------------------------------------------
# a folder, with its on-disk cache


@dataclass(frozen=True)
class FolderImages:
    """A decoded image folder.

    ``images``: uint8, N x C x H x W, contiguous. ``paths``: the N files (relative to the
    folder, POSIX separators) in the same order. ``skipped``: (relative path, reason) for each
    file that could not be decoded.
    """

    images: torch.Tensor
    paths: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is cheap (no re-import of torch in each worker) and safe here: the workers only run
    # Pillow and numpy, never torch. Elsewhere spawn is the only safe choice.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _cache_key(root: Path, rels: list[str], stats: list[os.stat_result], image_size: int, channels: int) -> str:
    h = hashlib.sha256()
    head = {
        "format": CACHE_FORMAT_VERSION,
        "pillow": PIL.__version__,
        "root": str(root),
        "image_size": image_size,
        "channels": channels,
        "count": len(rels),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for rel, st in zip(rels, stats):
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def _read_cache(npy: Path, meta: Path, key: str, image_size: int, channels: int) -> FolderImages | None:
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("key") != key or info.get("format") != CACHE_FORMAT_VERSION:
            return None
        paths = tuple(str(p) for p in info["paths"])
        skipped = tuple((str(p), str(r)) for p, r in info["skipped"])
        arr = _map_npy(npy)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        warnings.warn(f"image cache {npy} is damaged; decoding the folder again", DifflabWarning, stacklevel=3)
        return None
    if arr.dtype != np.uint8 or arr.shape != (len(paths), channels, image_size, image_size):
        warnings.warn(f"image cache {npy} does not match its index; decoding the folder again", DifflabWarning, stacklevel=3)
        return None
    return FolderImages(torch.from_numpy(arr), paths, skipped)


def _map_npy(npy: Path) -> np.ndarray:
    """The cached array, memory-mapped copy-on-write: every process that trains on the folder (each
    DDP rank on a node) reads the same page-cache pages, and only the batches it indexes are copied,
    so a data set larger than RAM trains without one. The cache file is only ever replaced by an
    atomic rename, never written in place, so a live mapping keeps the file it opened. An empty
    array cannot be mapped and is read instead."""
    try:
        return np.load(npy, mmap_mode="c", allow_pickle=False)
    except ValueError:
        if npy.stat().st_size > 4096:  # not the empty-array case: a damaged file
            raise
        return np.load(npy, allow_pickle=False)


def _write_cache(npy: Path, meta: Path, key: str, root: Path, result: FolderImages, image_size: int, channels: int) -> None:
    # The array goes first and the JSON index last: a reader needs both, and the index names
    # the key, so a crash between the two writes leaves no usable half-entry.
    try:
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.images.numpy(), allow_pickle=False)
        atomic_write_json(meta, {
            "key": key,
            "format": CACHE_FORMAT_VERSION,
            "root": str(root),
            "image_size": image_size,
            "channels": channels,
            "paths": list(result.paths),
            "skipped": [list(s) for s in result.skipped],
        })
    except OSError as e:  # a full or read-only cache disk must not lose the decoded data
        warnings.warn(f"could not write image cache {npy}: {e}", DifflabWarning, stacklevel=3)


def warn_skipped(root: str | os.PathLike[str], skipped: Sequence[tuple[str, str]], total: int,
                 *, stacklevel: int = 2) -> None:
    """Report skipped files in one :class:`SkippedImagesWarning` (count, plus the first few named).

    ``skipped``: (relative path, reason) pairs; nothing is reported when it is empty.
    ``stacklevel`` as for ``warnings.warn``, counted from the caller of this function.
    """
    if not skipped:
        return
    named = "; ".join(f"{_shown(p)} ({r})" for p, r in skipped[:_WARN_NAMES])
    more = f"; and {len(skipped) - _WARN_NAMES} more" if len(skipped) > _WARN_NAMES else ""
    warnings.warn(
        f"skipped {len(skipped)} of {total} image files in {_shown(root)} that could not be decoded: {named}{more}",
        SkippedImagesWarning,
        stacklevel=stacklevel + 1,
    )


def _decode_all(
    files: list[str], image_size: int, channels: int, *, progress: bool, workers: int, desc: str
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    n = len(files)
    out = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    workers = min(workers, n)
    chunk = max(1, min(256, math.ceil(n / (4 * workers))))
    starts = list(range(0, n, chunk))
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1:
            for s in starts:
                arr, b = _decode_chunk(files[s:s + chunk], image_size, channels)
                out[s:s + len(arr)] = arr
                bad.extend((s + i, r) for i, r in b)
                bar.update(len(arr))
        else:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                futures = {pool.submit(_decode_chunk, files[s:s + chunk], image_size, channels): s for s in starts}
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        s = futures[fut]
                        arr, b = fut.result()
                        out[s:s + len(arr)] = arr
                        bad.extend((s + i, r) for i, r in b)
                        bar.update(len(arr))
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    bad.sort()
    return out, bad


def load_folder(
    root: str | os.PathLike[str],
    image_size: int,
    channels: int = 3,
    *,
    progress: bool = True,
    workers: int | None = None,
) -> FolderImages:
    """Decode every image under ``root`` to ``image_size`` squares (see
    :func:`difflab.data.decode.resize_center_crop`).

    Unreadable files are left out, listed in ``skipped`` and reported in one
    :class:`SkippedImagesWarning`; a folder without a single usable image is a DataError.

    The result is cached in ``difflab.io.cache_dir("datasets")`` under a hash of the folder's
    absolute path, every file's relative path, size and mtime, ``image_size``, ``channels``,
    the Pillow version and a format version; a repeated call with nothing changed reads it back
    (identical tensor) instead of decoding. ``workers`` processes decode in parallel
    (default: the CPUs this process may use; folders under 512 files are decoded in-process).
    """
    image_size = _check_size(image_size)
    channels = _check_channels(channels)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    given = Path(root).expanduser()
    found = _find(given)
    if not found:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {_shown(given)}")
    rels: list[str] = []
    files: list[str] = []
    stats: list[os.stat_result] = []
    unreadable: dict[str, str] = {}
    for rel, path in found:
        rels.append(rel)
        files.append(path)
        try:
            stats.append(os.stat(path))
        except OSError as e:  # e.g. a dangling symlink: decoding will report it
            stats.append(os.stat_result((0,) * 10))
            unreadable[rel] = e.strerror or type(e).__name__
    abs_root = given.resolve()
    key = _cache_key(abs_root, rels, stats, image_size, channels)
    store = cache_dir("datasets")
    npy, meta = store / f"{key}.npy", store / f"{key}.json"

    cached = None if unreadable else _read_cache(npy, meta, key, image_size, channels)
    if cached is not None:
        warn_skipped(given, cached.skipped, len(rels), stacklevel=2)
        return cached

    if workers is None:
        workers = _default_workers() if len(files) >= _POOL_MIN_IMAGES else 1
    try:
        arr, bad = _decode_all(files, image_size, channels, progress=progress, workers=workers,
                               desc=f"decoding {given.name or given}")
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError(f"a decoding process died while reading {_shown(given)} (out of memory, or a file "
                        "crashed the image decoder); retry with one worker to find the file") from None
    ok = np.ones(len(files), dtype=bool)
    for i, _ in bad:
        ok[i] = False
    skipped = tuple((rels[i], reason) for i, reason in bad)
    if not ok.any():
        first = f" (first: {_shown(skipped[0][0])}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"none of the {len(files)} image files in {_shown(given)} could be decoded{first}")
    if not ok.all():
        arr = arr[ok]
    result = FolderImages(
        images=torch.from_numpy(np.ascontiguousarray(arr)),
        paths=tuple(r for r, good in zip(rels, ok) if good),
        skipped=skipped,
    )
    if not unreadable:
        _write_cache(npy, meta, key, abs_root, result, image_size, channels)
    warn_skipped(given, skipped, len(rels), stacklevel=2)
    return result
