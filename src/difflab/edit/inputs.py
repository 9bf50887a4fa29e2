"""Input images for editing: one file or a folder, decoded by difflab's one set of decoding rules
(:mod:`difflab.data.decode`), fitted to the run's size and channels, with a note for each change."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.data.decode import open_image, resize_center_crop
from difflab.data.images import IMAGE_EXTENSIONS, find_images
from difflab.errors import DataError


@dataclass(frozen=True)
class Inputs:
    """``images`` (N, C, S, S) in [-1, 1], the files they came from, their original sizes (w, h),
    and ``notes``: one line per change made to fit the run (resized, converted)."""

    images: Tensor
    files: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...]
    notes: tuple[str, ...]


def _is_grey(path: Path) -> bool:
    with Image.open(path) as im:
        return im.mode in ("1", "L", "LA", "I", "I;16", "F") or (im.mode == "P" and im.palette is not None
                                                                 and im.palette.mode in ("L", "LA"))


def to_tensor(img: Image.Image) -> Tensor:
    """A Pillow image (L or RGB) as float (C, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t / 127.5 - 1


def load_inputs(path: str | os.PathLike[str], image_size: int, channels: int, flag: str = "--image") -> Inputs:
    """The image ``path`` or every image in the folder ``path`` (sorted), as the run sees images:
    ``channels`` (grey inputs are converted for an RGB run and the other way round, with a note) and
    ``image_size`` square (the central square, Lanczos, as training data; a note says how many were
    resized). A missing path, an empty folder or an undecodable file is a one-line error naming it."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{flag} {root} does not exist")
    if root.is_dir():
        files = find_images(root)
        if not files:
            raise DataError(f"{flag} {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    else:
        files = [root]
    images, sizes, resized, converted = [], [], 0, 0
    for f in files:
        img = open_image(f, channels)
        sizes.append((img.width, img.height))
        converted += _is_grey(f) != (channels == 1)
        if img.size != (image_size, image_size):
            img = resize_center_crop(img, image_size)
            resized += 1
        images.append(to_tensor(img))
    notes = []
    if resized:
        notes.append(f"resized {resized} of {len(files)} input image(s) to the run's {image_size}x{image_size} "
                     "(central square, Lanczos)")
    if converted:
        notes.append(f"converted {converted} input image(s) to {'grey' if channels == 1 else 'RGB'}, as the run was "
                     f"trained on {'grey' if channels == 1 else 'RGB'} images")
    return Inputs(torch.stack(images), tuple(Path(f) for f in files), tuple(sizes), tuple(notes))
