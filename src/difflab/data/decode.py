"""Decoding one image file to a Pillow image, and resizing it to a square.

Decoding rules (shared by every loader, so a folder always means the same pixels):

* Any Pillow mode is accepted. Transparency (alpha channels and palette/tRNS transparency) is
  composited on **white**; 16-bit gray is scaled by 1/257; 32-bit integer and float images are
  mapped to 0..255 by the rule in :func:`_to_8bit_gray`. ``channels=1`` uses Pillow's ITU-R 601-2
  luma. An EXIF orientation tag is applied (phone photos are stored rotated). ICC profiles are
  ignored (pixels are taken as sRGB). Animated GIF/WebP: the first frame.
* :func:`resize_center_crop` maps the central square of the image (the shorter side) onto
  ``size x size`` in one Pillow Lanczos resample (antialiased: its support widens with the
  downscale factor), using ``reducing_gap=3.0`` so very large downscales first take an exact
  integer box reduction, as the Pillow docs recommend; nothing is rounded in between.
* In :func:`difflab.data.images.load_folder` JPEGs are additionally decoded with libjpeg's DCT
  scaling (``Image.draft``, the ``draft_size`` of :func:`_decode`) when the file is at least 4x
  the target on its shorter side; the decoded image stays >= 2x the target so the final Lanczos
  step still does the antialiasing.
"""
from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from struct import error as struct_error

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from difflab.errors import ConfigError, DataError

__all__ = [
    "BadImageError",
    "open_image",
    "resize_center_crop",
]


class BadImageError(DataError):
    """A file that should be an image cannot be decoded."""


def _check_channels(channels: object) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _check_size(size: object, what: str = "image_size") -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"{what} must be a positive integer, got {size!r}")
    return int(size)


# --------------------------------------------------------------------------------------------
# decoding one file


#: Elements per block of :func:`_to_8bit_gray`'s float64 arithmetic (8 MiB): a large image costs no
#: full-size float64 copies (an image at Pillow's pixel limit would take gigabytes of them).
_GRAY_BLOCK = 1 << 20


def _float_blocks(flat: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float64 copy) of each block of ``flat``, with NaN and infinities made 0."""
    for start in range(0, flat.size, _GRAY_BLOCK):
        with np.errstate(invalid="ignore"):  # a signalling NaN in a float image
            block = flat[start:start + _GRAY_BLOCK].astype(np.float64)
        yield start, np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float gray image to mode ``L``.

    ``I;16*``: divided by 257 (65535 -> 255). ``I`` and ``F`` carry no declared range, so:
    values already within 0..255 are kept; ``I`` within 0..65535 is treated as 16-bit;
    ``F`` within 0..1 is scaled by 255; anything else is min-max stretched to 0..255.
    NaN and infinities count as 0.
    """
    a = np.asarray(img)
    mode = img.mode
    flat = a.reshape(-1)
    lo, hi = 0.0, 0.0
    if flat.size and not mode.startswith("I;16"):
        ranges = [(float(b.min()), float(b.max())) for _, b in _float_blocks(flat)]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)

    def scale(b: np.ndarray) -> None:  # in place, the same arithmetic on every block
        if mode.startswith("I;16"):
            b /= 257.0
        elif lo >= 0.0 and hi <= 255.0 and not (mode == "F" and hi <= 1.0):
            pass
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            b /= 257.0
        elif mode == "F" and lo >= 0.0 and hi <= 1.0:
            b *= 255.0
        else:
            b -= lo
            b *= 255.0 / (hi - lo) if hi > lo else 0.0

    out = np.empty(flat.shape, dtype=np.uint8)
    for start, block in _float_blocks(flat):
        scale(block)
        out[start:start + block.size] = np.clip(np.rint(block, out=block), 0, 255, out=block)
    return Image.fromarray(out.reshape(a.shape))  # 2-D uint8 -> "L"


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def _convert(img: Image.Image, channels: int) -> Image.Image:
    """Decoded image of any mode -> ``RGB`` (channels=3) or ``L`` (channels=1)."""
    target = "RGB" if channels == 3 else "L"
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != target:
        img = img.convert(target)
    return img


def _decode(path: str | os.PathLike[str], channels: int | None,
            draft_size: int | None) -> tuple[Image.Image, tuple[float, float] | None]:
    """Open, fully decode and convert one file; return the image and its content size.

    ``channels`` None: no conversion, the pixels in the mode they are stored in (class-index
    masks, :mod:`difflab.data.paired`); the EXIF orientation is still applied.

    The content size is the exact extent of the original picture in the returned image's
    pixels when JPEG draft scaling made it a fraction of a pixel smaller than the rounded-up
    image size; otherwise None.
    """
    path = Path(path)
    name = _shown(path)
    try:
        # A FIFO (or a device) named like an image would block the open() below for ever.
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):
            raise BadImageError(f"{name}: not a regular file (a pipe, socket or device)")
        with warnings.catch_warnings():
            # Pillow warns (UserWarning) about damaged metadata of images it still decodes; the
            # pixels are what counts here, and bad EXIF is ignored anyway (see _orientation).
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                content: tuple[float, float] | None = None
                if draft_size is not None and im.format == "JPEG" and min(im.size) >= 4 * draft_size:
                    drafted = im.draft(None, (2 * draft_size, 2 * draft_size))
                    if drafted is not None:
                        content = (drafted[1][2], drafted[1][3])
                im.load()  # full decode: truncated or corrupt data fails here
                if im.width == 0 or im.height == 0:
                    raise BadImageError(f"{name}: image has zero width or height")
                img: Image.Image = im
                if _orientation(im) in (2, 3, 4, 5, 6, 7, 8):
                    img = ImageOps.exif_transpose(im)
                    content = None
                # The pixels are loaded, so the image stays valid after its file is closed.
                return (img if channels is None else _convert(img, channels)), content
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise BadImageError(f"{name}: is a folder, not an image") from None
    except PermissionError:
        raise BadImageError(f"{name}: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{name}: too many pixels, refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        empty = _is_empty(path)
        reason = "empty file" if empty else "not an image Pillow can read"
        raise BadImageError(f"{name}: {reason}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct_error, MemoryError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        text = " ".join(text.split()) or type(e).__name__  # one line
        if "truncated" in text:
            text = "truncated file (" + text + ")"
        raise BadImageError(f"{name}: cannot decode: {text}") from None


def _shown(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text on one line: bytes that are not UTF-8 as ``\\xff``, line breaks and
    other control characters as Python escapes (``\\n``); other paths unchanged."""
    text = os.fspath(path)
    if text.isprintable():
        return text
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte: escaped below
        pass
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, or 1 when absent or unreadable (bad EXIF never rejects pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no orientation"
        return 1


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def open_image(path: str | os.PathLike[str], channels: int = 3) -> Image.Image:
    """Fully decode ``path`` to a Pillow image of mode ``RGB`` (channels=3) or ``L`` (channels=1).

    See the module docstring for the conversion rules. Raises :class:`BadImageError` (one line,
    naming the file, with bytes that are not UTF-8 and control characters escaped) for a missing,
    empty, truncated, corrupt or non-image file, a FIFO or device (never opened), or one larger
    than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb warning is treated as an
    error here, inside a ``warnings.catch_warnings`` block; no global setting is changed).
    """
    channels = _check_channels(channels)
    img, _ = _decode(path, channels, None)
    return img


def _resize_box(img: Image.Image, size: int, content: tuple[float, float] | None) -> Image.Image:
    w, h = content if content is not None else (float(img.width), float(img.height))
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    return img.resize(
        (size, size),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` and keep the central ``size x size`` square.

    One Lanczos resample of the central square (no intermediate rounding); see the module docs.
    """
    size = _check_size(size, "size")
    return _resize_box(img, size, None)
