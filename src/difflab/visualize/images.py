"""Pictures: image grids and numbered image folders (Pillow only).

Plots (curves, schedules, animations) build on these in the other ``visualize`` modules; nothing
here needs matplotlib.
"""
from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path

import torch
from PIL import Image

from difflab.data.dataset import to_uint8
from difflab.errors import parse_choice
from difflab.io import atomic_path


class ImageFormat(str, Enum):
    """Formats of numbered sample folders."""

    JPG = "jpg"  # quality 95: what the homework hands in
    PNG = "png"  # lossless


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """Tile uint8 images (N, C, H, W) into one (C, H', W') image, ``nrow`` per row (default ~square)."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) tensor (C = 1 or 3) as a Pillow image."""
    arr = image.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else to_uint8(images)


def save_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None, scale: int = 1) -> Path:
    """Save images (uint8, or float in [-1, 1]) as one grid PNG/JPEG, written atomically."""
    path = Path(path)
    img = to_pil(make_grid(_as_uint8(images.detach().cpu()), nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format=_format(path))
    return path


# JPEG quality of a numbered folder (a hand-in): FID is sensitive to the encoding of small images. On the
# ladder's latent rung (64 px, n = 1000, BENCHMARKS.md "The homework ladder") the same images scored FID 146.6
# as PNG, 154.7 as JPEG quality 95 and 145.0 at quality 100, both with 4:2:0 chroma (the anime faces' own
# subsampling); 4:4:4 at quality 100 scored 157.3.
JPEG_QUALITY = 100


def save_numbered(images: torch.Tensor, out_dir: str | os.PathLike[str], start: int,
                  fmt: ImageFormat | str = ImageFormat.JPG, jpeg_quality: int = JPEG_QUALITY) -> None:
    """Save images as ``{start+1}.{fmt}``, ``{start+2}.{fmt}``, ... (the homework's 1-based layout);
    JPEGs at ``jpeg_quality`` with 4:2:0 chroma subsampling."""
    fmt = parse_choice(ImageFormat, fmt, "image format").value
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"JPEG quality {jpeg_quality} is outside 1 ... 100")
    jpeg = {"quality": jpeg_quality, "subsampling": "4:2:0"} if fmt in ("jpg", "jpeg") else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    u8 = _as_uint8(images.detach().cpu())
    for k in range(len(u8)):
        target = out / f"{start + k + 1}.{fmt}"
        with atomic_path(target) as tmp:
            to_pil(u8[k]).save(tmp, format=_format(target), **jpeg)


def _format(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF"}.get(ext, "PNG")
