"""Inpainting masks: True (white in a mask file) = regenerate, False = keep the input's pixels.

:func:`load_mask` reads a mask drawn for an input image (same size as the input, fitted to the run
exactly as the input is); :func:`make_mask` makes the standard ones for tests and demos;
:func:`downsample_mask` gives a mask at a latent run's resolution."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from difflab.data.decode import open_image, resize_center_crop
from difflab.errors import ConfigError, DataError, parse_choice


class MaskKind(str, Enum):
    CENTER = "center"  # the central square of half the side
    LEFT = "left"  # the left half
    RANDOM_BOXES = "random-boxes"  # one to four boxes of a quarter to half the side each


def load_mask(path: str | os.PathLike[str], image_size: int, input_size: tuple[int, int] | None = None,
              flag: str = "--mask") -> Tensor:
    """The mask file ``path`` as bool (1, S, S), True where the image is white (grey >= 128).

    ``input_size`` (w, h) is the size of the image it masks: a mask of another size is a one-line
    error (it would not line up); it is then fitted like the input (central square, resized)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{flag} {p} {'is not a file' if p.exists() else 'does not exist'}")
    img = open_image(p, 1)
    if input_size is not None and img.size != tuple(input_size):
        raise DataError(f"{flag} {p} is {img.width}x{img.height} but its image is {input_size[0]}x{input_size[1]}: "
                        "draw the mask at the image's size")
    if img.size != (image_size, image_size):
        img = resize_center_crop(img, image_size)
    mask = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(1, image_size, image_size) >= 128
    if not bool(mask.any()):
        raise DataError(f"{flag} {p} has no white pixels: there is nothing to regenerate")
    return mask


def make_mask(kind: MaskKind | str, image_size: int, generator: torch.Generator | None = None) -> Tensor:
    """A mask of ``kind`` as bool (1, S, S); ``random-boxes`` draws from ``generator``."""
    kind = parse_choice(MaskKind, kind, "--mask-kind")
    s = image_size
    if s < 2:
        raise ConfigError(f"masks need images of at least 2x2 pixels, got {s}")
    mask = torch.zeros(1, s, s, dtype=torch.bool)
    if kind is MaskKind.CENTER:
        lo, hi = s // 4, s - s // 4
        mask[:, lo:hi, lo:hi] = True
    elif kind is MaskKind.LEFT:
        mask[:, :, : s // 2] = True
    else:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            h, w = (int(v) for v in torch.randint(max(1, s // 4), s // 2 + 1, (2,), generator=g))
            y = int(torch.randint(0, s - h + 1, (), generator=g))
            x = int(torch.randint(0, s - w + 1, (), generator=g))
            mask[:, y : y + h, x : x + w] = True
    return mask


def downsample_mask(mask: Tensor, factor: int) -> Tensor:
    """A bool mask (N, C, H, W) at 1/``factor`` of its size: a cell is True (regenerate) when any pixel it
    covers is, so that everything the pixel mask asks to regenerate is regenerated (a latent run's
    latents, :mod:`difflab.latent`, each stand for a ``factor`` x ``factor`` block of pixels)."""
    n, c, h, w = mask.shape
    if mask.dtype != torch.bool or factor < 1 or h % factor or w % factor:
        raise ConfigError(f"cannot downsample a {mask.dtype} {h}x{w} mask by {factor}")
    return mask.reshape(n, c, h // factor, factor, w // factor, factor).any(dim=5).any(dim=3)
