"""Super-resolution (SR3, Saharia et al. 2021): a network that sees the bicubic upsampling of a
low-resolution image beside its input (``lowres``, :class:`difflab.models.unet.UNetConfig`
``cond_channels``) and generates the high-resolution image, or with ``upscale.residual`` its
difference from that upsampling (:class:`difflab.config.UpscaleConfig`).

Training pairs are made on the fly from each high-resolution batch (:func:`training_pair`):
downscaled with antialiasing (torch's bicubic with ``antialias=True``, what Pillow's resize does),
optionally noised, upsampled back bicubically. :func:`upscale_batches` runs any sampler on a set of
low-resolution images; a cascade feeds it the images of a base run (``difflab sample --upscale-run``).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.config import UpscaleConfig
from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers.run import SamplerConfig, sample_batches


def resize(x: Tensor, size: int) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] to ``size`` x ``size``: bicubic, antialiased when shrinking,
    clamped to [-1, 1] (bicubic overshoots at edges)."""
    shrink = size < x.shape[-1]
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=shrink).clamp(-1, 1)


def training_pair(x: Tensor, cfg: UpscaleConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(what the diffusion models, the ``lowres`` condition) for a high-resolution batch ``x``: the
    condition is ``x`` downscaled to ``cfg.from_size`` (plus noise of std ~ U[0, cfg.noise] per image)
    and upsampled back; the target is ``x``, or with ``cfg.residual`` ``x`` minus the condition, times
    ``cfg.scale``."""
    if cfg.residual and not cfg.scale:
        raise ConfigError("upscale.scale is 0 (not measured yet): the trainer measures it with measure_scale")
    low = resize(x, cfg.from_size)
    if cfg.noise:
        std = torch.rand(len(x), generator=generator) * cfg.noise
        z = torch.randn(low.shape, generator=generator)
        low = low + (std[:, None, None, None] * z).to(low.device)
    up = resize(low, x.shape[-1]).to(x.dtype)
    return ((x - up) * cfg.scale if cfg.residual else x).contiguous(memory_format=_format(x)), \
        up.contiguous(memory_format=_format(x))


def measure_scale(images: Tensor, from_size: int, sigma_data: float) -> float:
    """``upscale.scale`` for a residual run: ``sigma_data`` over the standard deviation of the residuals
    (image - bicubic upsampling of its ``from_size`` version, no conditioning noise) of ``images``
    (N, C, H, W in [-1, 1]; the trainer passes its first 1024), to three significant digits so the
    stored config reads plainly. Images with no detail beyond ``from_size`` give a ConfigError."""
    up = resize(resize(images, from_size), images.shape[-1])
    std = float((images.float() - up).std())
    if not std > 1e-4:
        raise ConfigError(f"the training images have no detail above {from_size} px (residual std {std:.2g}): "
                          "nothing for a super-resolution run to learn")
    return float(f"{sigma_data / std:.3g}")


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format


def upscale_batches(denoiser: Denoiser, low: Tensor, cfg: UpscaleConfig, image_size: int,
                    sampler: SamplerConfig, *, seed: int = 0, start: int = 0, stream: int = 1,
                    batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                    **kwargs: Any) -> Iterator[tuple[range, Tensor]]:
    """Yield (indices, ``image_size`` images in [-1, 1]) for the low-resolution images ``low`` (N, C,
    from_size, from_size) in [-1, 1]; image ``start + i`` draws from seed (seed, start + i, ``stream``)
    (stream 1 by default, so a cascade's two stages never share noise)."""
    if not cfg.active:
        raise ConfigError("this run is not a super-resolution run (train it with --task upscale --from S)")
    if low.ndim != 4 or low.shape[-1] != cfg.from_size or low.shape[-2] != cfg.from_size:
        raise ConfigError(f"the super-resolution run takes {cfg.from_size}x{cfg.from_size} images, got {tuple(low.shape[-2:])}")
    up = resize(low, image_size)
    shape = (low.shape[1], image_size, image_size)
    for idx, out in sample_batches(denoiser, len(low), shape, sampler, seed=seed, start=start, stream=stream,
                                   batch_size=batch_size, device=device, progress=progress, lowres=up, **kwargs):
        base = up[idx.start - start : idx.stop - start].to(out.device, out.dtype)
        if cfg.residual and not cfg.scale:
            raise ConfigError("this super-resolution run has upscale.scale 0: it was never trained")
        yield idx, (base + out / cfg.scale).clamp(-1, 1) if cfg.residual else out
