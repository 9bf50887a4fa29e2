"""Differentiable augmentation for GANs on small data sets (Zhao et al. 2020, "Differentiable
Augmentation for Data-Efficient GAN Training", ``DiffAugment_pytorch.py``): the same random
transforms are applied to every image the discriminator sees, real and fake, and gradients flow
through them to the generator, so D cannot memorise the few real images and G is not taught the
augmentations.

* ``color``: brightness + U(-0.5, 0.5); saturation: deviations from the pixel's channel mean scaled
  by U(0, 2); contrast: deviations from the image mean scaled by U(0.5, 1.5).
* ``translation``: a shift of up to 1/8 of the image size in each direction, zero-filled.
* ``cutout``: a square of half the image size at a random centre set to zero.

Parameters are drawn image by image from per-image generators (:func:`draw`) and applied in one
vectorised pass (:func:`apply`). ``groups`` > 1 treats (B, groups * C, H, W) as ``groups`` images per
example that share one draw (the DDGAN discriminator's (x_{t-1}, x_t) pairs): the same shift and
cutout for both, colour statistics per image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Params = dict[str, Tensor]
OPS = ("color", "translation", "cutout")


def draw(policy: Sequence[str], gens: Sequence[torch.Generator], size: int) -> Params:
    """Each image's transform parameters, drawn from its own generator in a fixed order."""
    shift, cut = int(size * 0.125 + 0.5), int(size * 0.5 + 0.5)
    rows: dict[str, list[Tensor]] = {}
    for g in gens:
        if "color" in policy:
            rows.setdefault("color", []).append(torch.rand(3, generator=g))
        if "translation" in policy:
            rows.setdefault("shift", []).append(torch.randint(-shift, shift + 1, (2,), generator=g))
        if "cutout" in policy:
            rows.setdefault("cutout", []).append(torch.randint(0, size + (1 - cut % 2), (2,), generator=g))
    return {k: torch.stack(v) for k, v in rows.items()}


def apply(x: Tensor, params: Params, groups: int = 1) -> Tensor:
    """``x`` (B, groups * C, H, W) transformed as ``params`` (from :func:`draw`) say."""
    if not params:
        return x
    b, gc, h, w = x.shape
    dev = x.device
    if "color" in params:
        u = params["color"].to(dev, x.dtype)
        y = x.reshape(b, groups, gc // groups, h, w)
        y = y + (u[:, 0] - 0.5)[:, None, None, None, None]
        mean = y.mean(dim=2, keepdim=True)
        y = (y - mean) * (u[:, 1] * 2)[:, None, None, None, None] + mean
        mean = y.mean(dim=(2, 3, 4), keepdim=True)
        y = (y - mean) * (u[:, 2] + 0.5)[:, None, None, None, None] + mean
        x = y.reshape(b, gc, h, w)
    if "shift" in params:
        s = params["shift"].to(dev)
        # out[i, j] = in[i - dy, j - dx] (zero outside): gather from the image padded by one zero pixel
        rows = (torch.arange(h, device=dev)[None, :] - s[:, 0:1] + 1).clamp(0, h + 1)  # (B, H)
        cols = (torch.arange(w, device=dev)[None, :] - s[:, 1:2] + 1).clamp(0, w + 1)  # (B, W)
        padded = torch.nn.functional.pad(x, [1, 1, 1, 1])
        idx = torch.arange(b, device=dev)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if "cutout" in params:
        c = params["cutout"].to(dev)
        cut_h, cut_w = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        top, left = c[:, 0] - cut_h // 2, c[:, 1] - cut_w // 2
        i, j = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_rows = (i[None] >= top[:, None]) & (i[None] < top[:, None] + cut_h)  # (B, H)
        in_cols = (j[None] >= left[:, None]) & (j[None] < left[:, None] + cut_w)  # (B, W)
        keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
        x = x * keep[:, None].to(x.dtype)
    return x
