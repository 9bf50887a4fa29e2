"""Pixel-fidelity metrics for paired images (super-resolution against its ground truth): PSNR and SSIM.

Written here rather than taken from scikit-image or torchmetrics: each is a few lines of torch with a
fixed, published definition, and either package would be a large dependency for them.

- PSNR = 10 log10(MAX^2 / MSE) per image, MAX = 255 on uint8 images (or 2 on [-1, 1] floats);
  an identical pair is +inf.
- SSIM (Wang et al. 2004, eq. 13) with the paper's constants: an 11 x 11 Gaussian window of
  sigma 1.5, K1 = 0.01, K2 = 0.03, L = MAX, computed per channel on the "valid" region (no padding),
  averaged over channels and pixels: what ``skimage.metrics.structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=...)``
  computes, apart from its handling of the border.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.errors import ConfigError


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, float]:
    if a.shape != b.shape or a.ndim != 4:
        raise ConfigError(f"paired metrics need two (N, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    peak = 255.0 if a.dtype == torch.uint8 else 2.0
    return a.double(), b.double(), peak


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB of each pair (N,): uint8 images (peak 255) or floats in [-1, 1] (peak 2)."""
    x, y, peak = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of each pair (N,), see the module docstring; images must be at least ``window`` wide."""
    x, y, peak = _pair(a, b)
    if min(x.shape[-2:]) < window:
        raise ConfigError(f"SSIM's {window}x{window} window needs images at least that large, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window(window, sigma).to(x)[None, None].expand(c, 1, window, window)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
