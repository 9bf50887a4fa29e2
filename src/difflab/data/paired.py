"""Paired data for segmentation: images and their per-pixel class-index masks.

A paired folder::

    root/images/<id>.jpg   the images (any extension and mode difflab.data.decode reads: RGB after decoding)
    root/masks/<id>.png    one mask per image, same id: 8-bit single-channel PNG whose pixel values are
                           class indices 0..K-1 (mode ``L``; palette ``P`` and bilevel ``1`` PNGs count by
                           their indices too); the same width and height as its image
    root/classes.txt       the K class names: ``index name`` per line (0..K-1 in order), or one name per line

An id is the file's path below ``images/`` (or ``masks/``) without its extension, so sub-folders may be
used as long as both sides mirror them. :func:`load_pairs` decodes every pair into uint8 tensors,
:func:`split_pairs` holds out a seeded validation split, :func:`joint_augment` flips and crops an image and
its mask together, and :func:`colorize` / :func:`overlay` draw masks for people to look at.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from difflab.data.dataset import resize_uint8, to_uint8
from difflab.data.decode import _check_size, _decode, _shown, open_image
from difflab.data.images import find_images
from difflab.errors import ConfigError, DataError, DifflabWarning
from difflab.io import atomic_path

__all__ = [
    "MAX_CLASSES",
    "PairAugment",
    "PairedData",
    "SkippedPairsWarning",
    "colorize",
    "joint_augment",
    "load_pairs",
    "overlay",
    "palette",
    "read_classes",
    "read_mask",
    "save_mask",
    "split_pairs",
]

#: Masks are 8-bit, so at most 256 classes (indices 0..255).
MAX_CLASSES = 256

#: Mask suffixes refused: JPEG compression blurs the class indices.
_LOSSY_MASKS = frozenset({".jpg", ".jpeg"})

_HOW_TO_SAVE = "save masks as 8-bit single-channel PNGs (mode L) whose pixel values are the class indices 0..K-1"


class SkippedPairsWarning(DifflabWarning):
    """Some pairs of a paired folder were bad and left out (``load_pairs(..., skip_bad=True)``)."""


@dataclass(frozen=True)
class PairedData:
    """A decoded paired folder.

    ``images``: uint8 (N, 3, S, S); ``masks``: uint8 (N, S, S) holding class indices < ``len(classes)``;
    ``ids``: the N ids, sorted, so that ``images[i]`` and ``masks[i]`` belong to ``ids[i]``;
    ``source``: where it came from, for logs; ``num_skipped``: bad pairs left out.
    """

    images: torch.Tensor
    masks: torch.Tensor
    classes: tuple[str, ...]
    ids: tuple[str, ...]
    source: str
    num_skipped: int


# --------------------------------------------------------------------------------------------
# classes.txt

_INDEX = re.compile(r"[+-]?\d+")


def read_classes(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a ``classes.txt``: ``index name`` per line, the indices 0..K-1 in order
    (a name may contain spaces), or one name per line (index = position). Blank lines are ignored.

    A line that breaks the order (a gap, a repeated index), mixes the two forms, or repeats a name is a
    one-line DataError naming the file and the line; so are fewer than 2 or more than 256 classes.
    """
    p = Path(path).expanduser()
    name = _shown(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{name}: no such class list (classes.txt: one 'index name' line per class)") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not a class list") from None
    except UnicodeDecodeError:
        raise DataError(f"{name}: is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    index_line: dict[int, int] = {}
    indexed: bool | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        has_index = len(parts) == 2 and _INDEX.fullmatch(parts[0]) is not None
        if indexed is None:
            indexed = has_index
        elif has_index != indexed:
            form = "'index name' lines" if indexed else "name-only lines"
            raise DataError(f"{name} line {lineno}: {line!r} does not match the {form} above it: use one form for every line")
        if has_index:
            index = int(parts[0])
            if index != len(names):
                if index in index_line:
                    raise DataError(f"{name} line {lineno}: class index {index} repeats line {index_line[index]}")
                raise DataError(f"{name} line {lineno}: expected class index {len(names)}, got {index}: "
                                "indices must run 0, 1, 2, ... in order, without gaps")
            index_line[index] = lineno
            cls = parts[1].strip()
        else:
            cls = line
        if cls in first_line:
            raise DataError(f"{name} line {lineno}: class name {cls!r} repeats line {first_line[cls]}")
        first_line[cls] = lineno
        names.append(cls)
    if len(names) < 2:
        raise DataError(f"{name}: needs at least 2 classes, found {len(names)}")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{name}: {len(names)} classes, but masks are 8-bit: at most {MAX_CLASSES}")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# masks


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be an integer in 1..{MAX_CLASSES}, got {num_classes!r}")
    return int(num_classes)


def _index_array(path: str | os.PathLike[str], what: str = "class indices", hint: str = _HOW_TO_SAVE) -> np.ndarray:
    """An 8-bit single-channel image (``L``, ``P`` by its indices, ``1`` as 0/1) as a uint8 H x W array;
    any other mode is a one-line DataError naming the file, saying it is not ``what``, then ``hint``."""
    name = _shown(path)
    img, _ = _decode(path, None, None)  # BadImageError (one line naming the file) when it cannot be read
    mode = img.mode
    if mode in ("L", "P"):
        return np.array(img, dtype=np.uint8)
    if mode == "1":
        return np.array(img, dtype=bool).astype(np.uint8)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        raise DataError(f"{name}: is an RGB image (mode {mode}), not {what}: {hint}")
    if len(img.getbands()) > 1:
        raise DataError(f"{name}: is a multi-band image (mode {mode}), not {what}: {hint}")
    raise DataError(f"{name}: is an image of mode {mode} (not 8-bit single-channel), not {what}: {hint}")


def read_mask(path: str | os.PathLike[str], num_classes: int | None = None) -> torch.Tensor:
    """The class-index mask in ``path`` as uint8 (H, W).

    Mode ``L`` (and palette ``P`` by its indices, bilevel ``1`` as 0/1) is read as it is stored. An RGB or
    RGBA mask, another multi-band or a 16-bit/float one, an unreadable file, and (when ``num_classes`` is
    given) an index >= ``num_classes`` are each a one-line DataError naming the file (and the bad value).
    """
    k = None if num_classes is None else _check_num_classes(num_classes)
    arr = _index_array(path)
    if k is not None and arr.size:
        top = int(arr.max())
        if top >= k:
            raise DataError(f"{_shown(path)}: holds class index {top}, but there are only {k} classes (0..{k - 1})")
    return torch.from_numpy(arr)


def save_mask(mask: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write a class-index mask ((H, W), or (1, H, W); integer values 0..255) as an 8-bit ``L`` PNG,
    atomically (:func:`difflab.io.atomic_path`). ``path`` must end in ``.png`` (masks must stay lossless)."""
    p = Path(path).expanduser()
    if p.suffix.lower() != ".png":
        raise ConfigError(f"{_shown(p)}: masks are saved as lossless PNG files: name it .png")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"save_mask expects an integer (H, W) mask, got {tuple(mask.shape)} {mask.dtype}")
    m = mask.detach().cpu()
    if m.numel() and (int(m.min()) < 0 or int(m.max()) > 255):
        raise ValueError(f"save_mask: class indices must be in 0..255, got {int(m.min())}..{int(m.max())}")
    img = Image.fromarray(m.to(torch.uint8).numpy())
    with atomic_path(p) as tmp:
        img.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------
# a paired folder


def _by_id(folder: Path, files: Iterable[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in files:
        key = f.relative_to(folder).with_suffix("").as_posix()
        if key in found:
            raise DataError(f"{_shown(f)}: a second file for {key!r} beside {_shown(found[key])}: keep one file per id")
        found[key] = f
    return found


def _square(img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The central square of an image (C, H, W) and its mask (H, W), cut at the same place."""
    h, w = mask.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[:, top:top + side, left:left + side], mask[top:top + side, left:left + side]


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of masks (..., H, W) to ``size`` (h, w), sampling at pixel centres as
    Pillow's NEAREST does; indices are copied, never blended."""
    if tuple(mask.shape[-2:]) == size:
        return mask
    lead = mask.shape[:-2]
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    y = F.interpolate(x, size=size, mode="nearest-exact")
    return y.round().to(mask.dtype).reshape(*lead, *size)


def _load_pair(key: str, image: Path | None, mask: Path | None, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One checked pair, cut to its central square: image uint8 (3, s, s), mask uint8 (s, s)."""
    if image is None:
        assert mask is not None
        raise DataError(f"{_shown(mask)}: a mask without an image (no images/{key}.* beside it)")
    if mask is None:
        raise DataError(f"{_shown(image)}: an image without a mask (no masks/{key}.png)")
    if mask.suffix.lower() in _LOSSY_MASKS:
        raise DataError(f"{_shown(mask)}: a JPEG mask, whose compression changes the class indices: {_HOW_TO_SAVE}")
    pic = open_image(image, 3)
    m = read_mask(mask, num_classes)
    if (pic.width, pic.height) != (m.shape[1], m.shape[0]):
        raise DataError(f"{_shown(mask)}: mask is {m.shape[1]}x{m.shape[0]} but its image {_shown(image)} "
                        f"is {pic.width}x{pic.height}")
    img = torch.from_numpy(np.array(pic, dtype=np.uint8)).permute(2, 0, 1)
    img, m = _square(img, m)
    return img.contiguous(), m.contiguous()


#: Pairs resized together (one batched interpolation per native size, not one call per pair).
_RESIZE_BATCH = 256


def _resize_pairs(images: list[torch.Tensor], masks: list[torch.Tensor], size: int) -> None:
    """Resize square pairs in place in the lists to ``size``: the images antialiased bicubic
    (:func:`difflab.data.dataset.resize_uint8`), the masks nearest neighbour, batched by native size."""
    by_side: dict[int, list[int]] = {}
    for i, m in enumerate(masks):
        by_side.setdefault(m.shape[0], []).append(i)
    for side, idx in by_side.items():
        if side == size:
            continue
        imgs = resize_uint8(torch.stack([images[i] for i in idx]), size)
        ms = _resize_mask(torch.stack([masks[i] for i in idx]), (size, size))
        for j, i in enumerate(idx):
            images[i], masks[i] = imgs[j], ms[j]


def load_pairs(root: str | os.PathLike[str], image_size: int | None = None, *, skip_bad: bool = False,
               progress: bool = True) -> PairedData:
    """Decode the paired folder ``root`` (see the module docstring) into :class:`PairedData`.

    Every pair is cut to its central square first (non-square pairs lose the same border on both
    sides); with ``image_size`` it is then resized to ``image_size`` pixels, the image by antialiased
    bicubic interpolation (:func:`difflab.data.dataset.resize_uint8`), the mask by nearest neighbour (no
    index is ever blended); with ``image_size=None`` the pairs keep their size, which must then be the
    same for all (else a DataError naming the first that differs).

    A bad pair (an image without a mask or a mask without an image, image and mask of different sizes,
    an RGB or multi-band mask, a JPEG mask, a class index outside ``classes.txt``, a file that cannot be
    decoded) is a one-line DataError naming the file; with ``skip_bad`` each such pair is left out and one
    :class:`SkippedPairsWarning` counts them and gives the first reason. A missing ``images/``, ``masks/``
    or ``classes.txt``, a bad ``classes.txt`` line, two files with one id on one side (``a.jpg`` and
    ``a.png``) and a folder with no usable pair are always errors.
    A tqdm bar shows the decoding unless ``progress`` is False.
    """
    size = None if image_size is None else _check_size(image_size)
    top = Path(root).expanduser()
    if not top.exists():
        raise DataError(f"paired folder {_shown(top)} does not exist")
    if not top.is_dir():
        raise DataError(f"{_shown(top)} is not a paired folder (images/, masks/, classes.txt)")
    images_dir, masks_dir, classes_file = top / "images", top / "masks", top / "classes.txt"
    for need, what in ((images_dir, "the images"), (masks_dir, "class-index PNG masks with the images' names"),
                       (classes_file, "one 'index name' line per class")):
        if not need.exists():
            raise DataError(f"{_shown(need)} is missing: a paired folder needs images/, masks/ and classes.txt ({what})")
    classes = read_classes(classes_file)
    images = _by_id(images_dir, find_images(images_dir))
    masks = _by_id(masks_dir, find_images(masks_dir))
    keys = sorted(set(images) | set(masks))
    if not keys:
        raise DataError(f"{_shown(top)}: no pairs: images/ and masks/ hold no image files")
    kept_images: list[torch.Tensor] = []
    kept_masks: list[torch.Tensor] = []
    ids: list[str] = []
    bad: list[str] = []
    pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    first_side = 0  # the first pair's side: without an image size every pair must have it

    def flush() -> None:
        if size is not None:
            _resize_pairs(*pending, size)
        kept_images.extend(pending[0])
        kept_masks.extend(pending[1])
        pending[0].clear()
        pending[1].clear()

    for key in tqdm(keys, desc=f"decoding {top.name or top}", unit="pair", disable=not progress, dynamic_ncols=True):
        try:
            img, m = _load_pair(key, images.get(key), masks.get(key), len(classes))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        if not ids:
            first_side = m.shape[0]
        elif size is None and m.shape[0] != first_side:
            raise DataError(f"{_shown(images[key])}: is {m.shape[1]}x{m.shape[0]} (its central square) but "
                            f"{_shown(images[ids[0]])} is {first_side}x{first_side}: "
                            "give an image size to resize every pair to one size")
        pending[0].append(img)
        pending[1].append(m)
        ids.append(key)
        if len(pending[0]) >= _RESIZE_BATCH:
            flush()
    flush()
    if not ids:
        raise DataError(f"none of the {len(keys)} pairs in {_shown(top)} is usable (first: {bad[0]})")
    if bad:
        more = f"; and {len(bad) - 1} more" if len(bad) > 1 else ""
        warnings.warn(f"skipped {len(bad)} of {len(keys)} pairs in {_shown(top)}: {bad[0]}{more}",
                      SkippedPairsWarning, stacklevel=2)
    skipped = f", {len(bad)} skipped" if bad else ""
    return PairedData(
        images=torch.stack(kept_images).contiguous(),
        masks=torch.stack(kept_masks).contiguous(),
        classes=classes,
        ids=tuple(ids),
        source=f"paired folder {top.resolve()} ({len(ids)} pairs, {len(classes)} classes{skipped})",
        num_skipped=len(bad),
    )


def split_pairs(data: PairedData, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) into ``data``, each sorted ascending (int64).

    The ids are put in sorted order and permuted by a generator seeded with ``seed``; the first
    ``round(val_fraction * N)`` are held out. The split depends only on the set of ids and ``seed``,
    not on the order the files were found in. ``val_fraction`` in [0, 1); at least one pair stays
    for training.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not (math.isfinite(val_fraction) and 0.0 <= val_fraction < 1.0):
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    n = len(data.ids)
    n_val = int(round(val_fraction * n))
    if n_val >= n:
        raise ConfigError(f"val_fraction {val_fraction} of {n} pairs leaves none for training")
    order = torch.tensor(sorted(range(n), key=lambda i: data.ids[i]), dtype=torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chosen = order[perm]
    return chosen[n_val:].sort().values, chosen[:n_val].sort().values


# --------------------------------------------------------------------------------------------
# pictures of masks


def palette(num_classes: int = MAX_CLASSES) -> torch.Tensor:
    """The fixed class colours, uint8 (num_classes, 3): the PASCAL VOC palette (class 0 black, 1 dark
    red, 2 dark green, 3 olive, 4 navy, 5 purple, 6 teal, 7 grey, ...), distinct for all 256 indices."""
    k = _check_num_classes(num_classes)
    idx = torch.arange(k, dtype=torch.int64)
    rgb = torch.zeros(k, 3, dtype=torch.int64)
    for bit in range(8):
        for channel in range(3):
            rgb[:, channel] |= ((idx >> (3 * bit + channel)) & 1) << (7 - bit)
    return rgb.to(torch.uint8)


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """A class-index mask (H, W) (or (N, H, W)) as a uint8 colour picture (3, H, W) (or (N, 3, H, W)),
    one fixed colour per class from :func:`palette` (class 0 black)."""
    if mask.ndim not in (2, 3) or mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"colorize expects an integer (H, W) or (N, H, W) mask, got {tuple(mask.shape)} {mask.dtype}")
    m = mask.long()
    if m.numel() and (int(m.min()) < 0 or int(m.max()) >= MAX_CLASSES):
        raise ValueError(f"colorize: class indices must be in 0..{MAX_CLASSES - 1}, got {int(m.min())}..{int(m.max())}")
    return palette().to(m.device)[m].movedim(-1, -3).contiguous()


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``image`` blended with ``colorize(mask)``: ``(1 - alpha) * image + alpha * colours``, uint8 (3, H, W).

    ``image``: uint8 (3, H, W) or (1, H, W) pixels, or floats in [-1, 1]; ``mask``: (H, W) class indices
    of the same size; ``alpha`` in [0, 1] (0: the image, 1: the colours)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"overlay alpha must be a number in [0, 1], got {alpha!r}")
    if image.ndim != 3 or image.shape[0] not in (1, 3) or tuple(image.shape[1:]) != tuple(mask.shape):
        raise ValueError(f"overlay expects an image (3, H, W) and a mask (H, W) of one size, got "
                         f"{tuple(image.shape)} and {tuple(mask.shape)}")
    pixels = image if image.dtype == torch.uint8 else to_uint8(image)
    colours = colorize(mask).to(pixels.device).float()
    blended = (1.0 - alpha) * pixels.expand(3, -1, -1).float() + alpha * colours
    return blended.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# augmentation of a pair


@dataclass(frozen=True)
class PairAugment:
    """What :func:`joint_augment` does to an image and its mask together; the default does nothing.

    ``hflip``: mirror left-right with probability 1/2. ``crop`` in [0, 1): cut a random square whose side
    is a fraction uniform in [1 - crop, 1] of the side, at a uniform position, and resize it back.
    """

    hflip: bool = False
    crop: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"pair augment hflip must be true or false, got {self.hflip!r}")
        c = self.crop
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and 0.0 <= c < 1.0):
            raise ConfigError(f"pair augment crop must be a number in [0, 1), got {c!r}")
        object.__setattr__(self, "crop", float(c))

    @property
    def is_identity(self) -> bool:
        return not self.hflip and self.crop == 0.0


def _draw(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device, dtype=torch.float64))


def joint_augment(image: torch.Tensor, mask: torch.Tensor, cfg: PairAugment,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip and crop applied to ``image`` (float (C, H, W) in [-1, 1]) and ``mask``
    ((H, W) class indices, any integer dtype, returned in that dtype).

    Random numbers come from ``generator`` only, in a fixed order and number (flip: one; crop: three,
    for the fraction, the top and the left), each drawn only when its part is enabled. The crop's
    square (of side ``round(f * min(H, W))``) is resized back to H x W, the image by bilinear
    interpolation (which never leaves [-1, 1]), the mask by nearest neighbour: the mask's values stay
    class indices, no colour change ever touches it. With nothing enabled both inputs are returned as
    they are.
    """
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"joint_augment expects a float (C, H, W) image, got {tuple(image.shape)} {image.dtype}")
    if mask.ndim != 2 or tuple(mask.shape) != tuple(image.shape[1:]) or mask.is_floating_point():
        raise ValueError(f"joint_augment expects an integer (H, W) mask of the image's size, got {tuple(mask.shape)} "
                         f"{mask.dtype} for an image {tuple(image.shape)}")
    if cfg.is_identity:
        return image, mask
    h, w = mask.shape
    if cfg.hflip and _draw(generator) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if cfg.crop > 0.0:
        fraction = 1.0 - cfg.crop * _draw(generator)
        side = min(max(1, round(fraction * min(h, w))), min(h, w))
        top = min(int(_draw(generator) * (h - side + 1)), h - side)
        left = min(int(_draw(generator) * (w - side + 1)), w - side)
        if side != h or side != w:
            cut = image[None, :, top:top + side, left:left + side]
            image = F.interpolate(cut, size=(h, w), mode="bilinear", align_corners=False)[0]
            mask = _resize_mask(mask[top:top + side, left:left + side], (h, w))
    return image.contiguous(), mask.contiguous()
