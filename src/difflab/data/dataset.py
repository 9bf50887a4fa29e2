"""One entry point for training data: a built-in data set name or a folder of images.

Images are kept as uint8 (N x C x H x W) in memory; :func:`to_float` turns a batch into the
[-1, 1] floats the models see, and :func:`to_uint8` turns model output back into pixels.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.data.decode import _check_channels, _check_size
from difflab.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from difflab.data.images import find_images, load_folder
from difflab.data.labels import (
    FASHION_MNIST_CLASSES,
    Labels,
    LabelSchema,
    fashion_mnist_labels,
    folder_labels,
)
from difflab.data.labels_csv import csv_labels
from difflab.errors import ConfigError, DataError, DifflabWarning

__all__ = ["BUILTIN_DATASETS", "ImageData", "load_dataset", "resize_uint8", "to_float", "to_uint8"]

#: Names :func:`load_dataset` understands besides folder paths.
BUILTIN_DATASETS = ("fashion-mnist",)


@dataclass(frozen=True)
class ImageData:
    """Training images (uint8, N x C x H x W, contiguous), their labels if asked for (one row per
    image: :class:`~difflab.data.labels.Labels`), and provenance."""

    images: torch.Tensor
    labels: Labels | None
    source: str
    num_skipped: int


def to_float(u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels 0..255 -> floats in [-1, 1] (0 -> -1, 255 -> 1), keeping the memory format."""
    if u8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 pixels, got {u8.dtype}")
    return u8.to(dtype) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 pixels: scaled, rounded to nearest, clamped to 0..255.

    ``to_uint8(to_float(u))`` equals ``u`` exactly; NaN becomes 0.
    """
    y = ((x.float() + 1.0) * 127.5).round().clamp(0.0, 255.0)
    return torch.nan_to_num(y, nan=0.0).to(torch.uint8)


def resize_uint8(images: torch.Tensor, size: int, *, batch: int = 4096) -> torch.Tensor:
    """Resize uint8 N x C x H x W images to size x size with antialiased bicubic interpolation."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], batch):
        x = images[s:s + batch].float()
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[s:s + batch] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _labels_for(spec: str, name: str, root: Path | None, paths: Sequence[str], targets: torch.Tensor | None) -> Labels | None:
    if spec == "none":
        return None
    if spec == "classes":
        if targets is None:
            raise ConfigError(f"--labels classes names a built-in data set's own classes ({', '.join(BUILTIN_DATASETS)}); "
                              f"for the folder {name} use --labels folders or --labels FILE.csv")
        return fashion_mnist_labels(targets)
    if root is None:
        raise ConfigError(f"--labels {spec} needs a folder of images, not the built-in {name}")
    return folder_labels(paths, root) if spec == "folders" else csv_labels(spec, paths)


def label_schema(spec: str | os.PathLike[str], labels: str) -> LabelSchema | None:
    """The label names of a data source without decoding any image (for resolving a run's config);
    the warnings about the label file come when the data is loaded."""
    name = os.fspath(spec)
    if labels == "none":
        return None
    if name in BUILTIN_DATASETS:
        if labels != "classes":
            _labels_for(labels, name, None, (), None)  # raises: folders/CSV need a folder
        return LabelSchema(("class",), (FASHION_MNIST_CLASSES,))
    root = Path(name).expanduser()
    paths = [p.relative_to(root).as_posix() for p in find_images(root)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DifflabWarning)
        found = _labels_for(labels, name, root, paths, None)
    return None if found is None else found.schema


def load_dataset(spec: str | os.PathLike[str], image_size: int, channels: int | None = None,
                 *, labels: str = "none", progress: bool = True) -> ImageData:
    """Training images from ``spec``: "fashion-mnist" (train split) or a folder of images.

    ``channels``: 1 or 3; default 1 for fashion-mnist (3 repeats the gray channel) and 3 for a
    folder. A folder is decoded by :func:`difflab.data.images.load_folder` (cached); to use a
    folder that happens to be called "fashion-mnist", pass it as "./fashion-mnist". ``labels``
    (``none``, ``classes``, ``folders`` or a CSV file, :mod:`difflab.data.labels`, :mod:`difflab.data.labels_csv`)
    attaches one label row per image; images the labels leave out are dropped (the loader warns with a count).
    """
    image_size = _check_size(image_size)
    if channels is not None:
        channels = _check_channels(channels)
    name = os.fspath(spec)
    if name in BUILTIN_DATASETS:
        ch = 1 if channels is None else channels
        folder = find_fashion_mnist(None, "train", progress=progress)
        images, targets = load_fashion_mnist(folder, "train", progress=progress)
        images = resize_uint8(images, image_size)
        if ch == 3:
            images = images.expand(-1, 3, -1, -1)
        return ImageData(
            images=images.contiguous(),
            labels=_labels_for(labels, name, None, (), targets),
            source=f"fashion-mnist train ({len(targets)} images from {folder.resolve()})",
            num_skipped=0,
        )
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"no such data folder {path} (built-in data sets: {', '.join(BUILTIN_DATASETS)})")
    ch = 3 if channels is None else channels
    decoded = load_folder(path, image_size, ch, progress=progress)
    found = _labels_for(labels, name, path, decoded.paths, None)
    images = decoded.images if found is None or bool(found.keep.all()) else decoded.images[found.keep].contiguous()
    skipped = f", {len(decoded.skipped)} skipped" if decoded.skipped else ""
    return ImageData(
        images=images,
        labels=found,
        source=f"folder {path.resolve()} ({len(decoded.paths)} images{skipped})",
        num_skipped=len(decoded.skipped),
    )
