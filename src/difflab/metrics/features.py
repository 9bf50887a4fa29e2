"""Folders of images -> Inception features, and the cache of reference statistics.

A folder is read with ``difflab.data.images.find_images`` (recursive, sorted, the same
extensions as training) and ``difflab.data.decode.open_image`` (the same decoding rules). Files
that cannot be decoded are skipped, counted and reported in one
:class:`~difflab.data.images.SkippedImagesWarning`, as training does; a folder with no usable
image is a :class:`~difflab.errors.DataError`.

Reference statistics (``.npz``, read with ``allow_pickle=False``) hold the features (float32,
needed by KID), their mean and covariance (float64, for FID), the image paths, the skipped
files, the protocol, and the folder digest. They are cached in
``difflab.io.cache_dir("fid-stats")`` under a key made of

* the folder's *contents*: sha256 over every image file's relative path and bytes (so a copy
  of the folder elsewhere hits the cache, and any edited, added or removed file misses it), and
* the protocol: network sha256, resize rule, input scaling, precision and this file's
  :data:`STATS_FORMAT`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from difflab.errors import DataError, DifflabWarning
from difflab.io import atomic_path, cache_dir
from difflab.metrics.fid import GaussianStats, gaussian_stats
from difflab.metrics.inception import InceptionFeatures

__all__ = [
    "STATS_FORMAT",
    "FolderScan",
    "ReferenceStats",
    "folder_digest",
    "folder_features",
    "load_stats",
    "reference_stats",
    "save_stats",
    "stats_cache_path",
]

#: Bump when the layout or meaning of a stats file changes.
STATS_FORMAT = 1


class FolderScan:
    """The image files of one folder, decoded in batches, with bad files skipped and counted."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from difflab.data.images import IMAGE_EXTENSIONS, find_images

        self.root = Path(root).expanduser()
        self.files = find_images(self.root)
        if not self.files:
            raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}")
        self.paths: list[str] = []  # relative paths of the images decoded so far
        self.skipped: list[tuple[str, str]] = []

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def batches(self, batch_size: int, *, progress: bool = True, desc: str = "images",
                limit: int | None = None) -> Iterator[list[Image.Image]]:
        """Decoded RGB images, one batch per ``batch_size`` files (fewer where files were skipped)."""
        from difflab.data.decode import BadImageError, open_image

        files = self.files if limit is None else self.files[:limit]
        with tqdm(total=len(files), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                batch: list[Image.Image] = []
                for path in chunk:
                    try:
                        img = open_image(path, channels=3)
                    except BadImageError as e:
                        prefix = f"{path}: "
                        reason = str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)
                        self.skipped.append((self.rel(path), reason))
                    else:
                        self.paths.append(self.rel(path))
                        batch.append(img)
                if batch:
                    yield batch
                bar.update(len(chunk))  # after the consumer has processed the batch
        self.warn_skipped(len(files))
        if not self.paths:
            raise DataError(f"none of the {len(files)} image files in {self.root} could be decoded")

    def warn_skipped(self, total: int) -> None:
        from difflab.data.images import warn_skipped

        warn_skipped(self.root, self.skipped, total, stacklevel=3)

def folder_digest(root: Path, files: list[Path]) -> str:
    """sha256 over (relative path, file bytes) of ``files``, in order."""
    h = hashlib.sha256()
    h.update(f"difflab-folder-digest-v1 {len(files)}".encode())
    for p in files:
        h.update(b"\0" + p.relative_to(root).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:  # unreadable now: part of the key, and skipped later when decoded
            h.update(f"<unreadable {type(e).__name__}>".encode())
    return h.hexdigest()


def folder_features(scan: FolderScan, extractor: InceptionFeatures, *, progress: bool = True,
                    desc: str = "inception", limit: int | None = None) -> np.ndarray:
    """N x 2048 float32 features of the decodable images of ``scan`` (order: ``scan.paths``)."""
    out = [extractor.images(batch) for batch in scan.batches(extractor.batch_size, progress=progress,
                                                              desc=desc, limit=limit)]
    return np.concatenate(out).astype(np.float32, copy=False)


@dataclass(frozen=True)
class ReferenceStats:
    features: np.ndarray  # N x 2048 float32
    stats: GaussianStats
    paths: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    protocol: dict
    digest: str
    source: str  # the folder or the .npz it came from

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def _protocol_key(protocol: dict) -> str:
    text = json.dumps({"stats_format": STATS_FORMAT, **protocol}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stats_cache_path(digest: str, protocol: dict) -> Path:
    return cache_dir("fid-stats") / f"{digest[:24]}-{_protocol_key(protocol)[:12]}.npz"


def save_stats(path: str | os.PathLike[str], ref: ReferenceStats) -> Path:
    """Write ``ref`` to ``path`` (atomically, no pickled objects)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.array(STATS_FORMAT),
                features=ref.features.astype(np.float32, copy=False),
                mu=ref.stats.mu,
                sigma=ref.stats.sigma,
                paths=np.array(ref.paths, dtype=np.str_),
                skipped=np.array([f"{p}\t{r}" for p, r in ref.skipped], dtype=np.str_).reshape(-1),
                protocol=np.array(json.dumps(ref.protocol, sort_keys=True)),
                digest=np.array(ref.digest),
                source=np.array(ref.source),
            )
    return path


def load_stats(path: str | os.PathLike[str], protocol: dict | None = None) -> ReferenceStats:
    """Read a stats file; if ``protocol`` is given it must match the file's exactly."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = int(z["format"])
            if fmt != STATS_FORMAT:
                raise DataError(f"{path}: stats format {fmt}, this difflab reads format {STATS_FORMAT}; recompute it")
            features = np.asarray(z["features"], dtype=np.float32)
            mu = np.asarray(z["mu"], dtype=np.float64)
            sigma = np.asarray(z["sigma"], dtype=np.float64)
            paths = tuple(str(p) for p in z["paths"])
            skipped = tuple(tuple(str(s).split("\t", 1)) for s in z["skipped"])
            file_protocol = json.loads(str(z["protocol"]))
            digest = str(z["digest"])
            source = str(z["source"])
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"stats file {path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a difflab FID stats file ({type(e).__name__}: {e})") from None
    d = features.shape[1] if features.ndim == 2 else -1
    if features.ndim != 2 or mu.shape != (d,) or sigma.shape != (d, d) or len(paths) != features.shape[0]:
        raise DataError(f"{path}: inconsistent arrays (features {features.shape}, mu {mu.shape}, sigma {sigma.shape})")
    if protocol is not None and file_protocol != protocol:
        diff = sorted(k for k in set(protocol) | set(file_protocol) if protocol.get(k) != file_protocol.get(k))
        raise DataError(f"{path} was computed with another protocol (differs in: {', '.join(diff)}); recompute it")
    stats = GaussianStats(mu, sigma, int(features.shape[0]))
    return ReferenceStats(features, stats, paths, skipped, file_protocol, digest, source)  # type: ignore[arg-type]


def reference_stats(root: str | os.PathLike[str], extractor: InceptionFeatures, *, progress: bool = True,
                    use_cache: bool = True) -> tuple[ReferenceStats, Path, bool]:
    """Features and statistics of a folder, from the cache when its contents and protocol match.

    Returns the statistics, the cache file, and whether it was a cache hit.
    """
    scan = FolderScan(root)
    protocol = extractor.protocol()
    digest = folder_digest(scan.root, scan.files)
    cached = stats_cache_path(digest, protocol)
    if use_cache and cached.is_file():
        try:
            ref = load_stats(cached, protocol)
            if ref.digest == digest:
                scan.skipped = list(ref.skipped)
                scan.warn_skipped(len(scan.files))
                return ref, cached, True
        except DataError as e:
            warnings.warn(f"ignoring a damaged stats cache file: {e}", DifflabWarning, stacklevel=2)
    feats = folder_features(scan, extractor, progress=progress, desc=f"inception {scan.root.name}")
    ref = ReferenceStats(feats, gaussian_stats(feats, str(scan.root)), tuple(scan.paths), tuple(scan.skipped),
                         protocol, digest, str(scan.root.resolve()))
    try:
        save_stats(cached, ref)
    except OSError as e:  # a full or read-only cache must not lose the result
        warnings.warn(f"could not write the stats cache {cached}: {e}", DifflabWarning, stacklevel=2)
    return ref, cached, False
