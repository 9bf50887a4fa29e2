"""Training-time augmentation of float image batches in [-1, 1], entirely in torch.

Each part draws one random number per image from the generator that is passed in, in a fixed
order (flip, rotation, brightness, contrast; only the enabled parts draw), so the result is a
pure function of the input and the generator state.

* ``hflip``: each image is mirrored left-right with probability 1/2.
* ``rotate_degrees = d``: each image is rotated by an angle uniform in [-d, d] degrees about its
  centre (positive = counter-clockwise on screen, as ``PIL.Image.rotate``), bilinear sampling
  with reflection padding (no black corners), via ``F.affine_grid`` + ``F.grid_sample``.
* ``brightness = b``: an offset uniform in [-b, b] is added to each image (in [-1, 1] units,
  so b = 0.1 moves the mean by at most 5% of the full range).
* ``contrast = c``: each image's deviations from its own mean (over channels and pixels) are
  scaled by a factor uniform in [1 - c, 1 + c].

Brightness and contrast clamp the result to [-1, 1]; flips and rotations cannot leave it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difflab.errors import ConfigError

__all__ = ["AugmentConfig", "augment"]


def _number(value: object, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"augment {what} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ConfigError(f"augment {what} must be in [{lo:g}, {hi:g}], got {value!r}")
    return v


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment` does; the default does nothing."""

    hflip: bool = False
    rotate_degrees: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"augment hflip must be true or false, got {self.hflip!r}")
        object.__setattr__(self, "rotate_degrees", _number(self.rotate_degrees, "rotate_degrees", 0.0, 180.0))
        object.__setattr__(self, "brightness", _number(self.brightness, "brightness", 0.0, 2.0))
        object.__setattr__(self, "contrast", _number(self.contrast, "contrast", 0.0, 1.0))

    @property
    def is_identity(self) -> bool:
        return not self.hflip and self.rotate_degrees == 0 and self.brightness == 0 and self.contrast == 0


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(device=like.device)


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``x`` by ``degrees[i]`` (counter-clockwise on screen) about its centre."""
    n, _, h, w = x.shape
    rad = degrees.to(torch.float64) * (math.pi / 180.0)
    c, s = torch.cos(rad), torch.sin(rad)
    # affine_grid maps output to input in normalised coordinates (x/(W/2), y/(H/2)); the pixel
    # rotation R conjugated by that scaling keeps non-square images undistorted.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = c
    theta[:, 0, 1] = -s * (h / w)
    theta[:, 1, 0] = s * (w / h)
    theta[:, 1, 1] = c
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch ``x`` (N x C x H x W, values in [-1, 1]) as ``cfg`` says.

    Returns ``x`` itself when ``cfg`` does nothing; otherwise a new tensor of the same dtype,
    device and memory format (channels_last stays channels_last).
    """
    if cfg.is_identity:
        return x
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augment expects a float N x C x H x W batch, got {tuple(x.shape)} {x.dtype}")
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    n = x.shape[0]
    if cfg.hflip:
        flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
        x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(-1), x)
    if cfg.rotate_degrees > 0:
        x = _rotate(x, _uniform(n, -cfg.rotate_degrees, cfg.rotate_degrees, generator, x))
    if cfg.brightness > 0 or cfg.contrast > 0:
        if cfg.brightness > 0:
            offset = _uniform(n, -cfg.brightness, cfg.brightness, generator, x).to(x.dtype)
            x = x + offset.view(n, 1, 1, 1)
        if cfg.contrast > 0:
            factor = _uniform(n, 1.0 - cfg.contrast, 1.0 + cfg.contrast, generator, x).to(x.dtype)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * factor.view(n, 1, 1, 1) + mean
        x = x.clamp(-1.0, 1.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
