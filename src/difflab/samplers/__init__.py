"""Samplers: pure functions of (denoiser, x, grid, generator, callback), plus the driver that
turns a trained denoiser into N images with one seed per image."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.denoiser import Denoiser
from difflab.errors import ConfigError, parse_choice
from difflab.samplers.base import Callback, Step
from difflab.samplers.ddim import sample_ddim
from difflab.samplers.ddpm import sample_ddpm
from difflab.samplers.grid import Grid, Spacing, discrete_grid, spaced_timesteps
from difflab.samplers.noise import Generators, image_generators, image_seed, randn, randn_like
from difflab.schedule import NoiseSchedule, VarianceType

__all__ = [
    "Grid", "SamplerConfig", "SamplerKind", "Spacing", "Step", "discrete_grid", "image_generators",
    "image_seed", "make_grid", "run_sampler", "sample", "sample_batches", "sample_ddim", "sample_ddpm",
    "spaced_timesteps",
]


class SamplerKind(str, Enum):
    DDPM = "ddpm"
    DDIM = "ddim"


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler, on which grid. ``steps=None`` means every training timestep."""

    sampler: SamplerKind = SamplerKind.DDIM
    steps: int | None = 50
    eta: float = 0.0
    spacing: Spacing = Spacing.UNIFORM
    variance: VarianceType = VarianceType.FIXED_SMALL

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", parse_choice(SamplerKind, self.sampler, "sampler"))
        object.__setattr__(self, "spacing", parse_choice(Spacing, self.spacing, "timestep spacing"))
        object.__setattr__(self, "variance", parse_choice(VarianceType, self.variance, "variance type"))
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"--steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"--eta must be in [0, 1], got {self.eta}")
        if self.eta != 0.0 and self.sampler is not SamplerKind.DDIM:
            raise ConfigError(f"--eta applies to the ddim sampler only, not {self.sampler.value}")

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


def make_grid(schedule: NoiseSchedule, cfg: SamplerConfig) -> Grid:
    if cfg.steps is not None and cfg.steps > schedule.num_timesteps:
        raise ConfigError(f"--steps {cfg.steps} exceeds the model's {schedule.num_timesteps} training timesteps")
    return discrete_grid(schedule, cfg.steps, cfg.spacing)


def run_sampler(
    denoiser: Denoiser, x: Tensor, grid: Grid, cfg: SamplerConfig, *,
    generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    if cfg.sampler is SamplerKind.DDPM:
        return sample_ddpm(denoiser, x, grid, variance=cfg.variance, generator=generator, callback=callback, **cond)
    return sample_ddim(denoiser, x, grid, eta=cfg.eta, generator=generator, callback=callback, **cond)


def sample_batches(
    denoiser: Denoiser,
    n: int,
    shape: Sequence[int],
    cfg: SamplerConfig = SamplerConfig(),
    *,
    seed: int = 0,
    batch_size: int = 64,
    start: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callback = None,
    **cond: Any,
) -> Iterator[tuple[range, Tensor]]:
    """Yield (image indices, images in [-1, 1]) batch by batch; image k uses seed (seed, k)."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    grid = make_grid(denoiser.schedule, cfg)
    bar = tqdm(total=n, desc=f"sampling {cfg.sampler.value}", unit="img", disable=not progress)
    for lo in range(start, start + n, batch_size):
        idx = range(lo, min(lo + batch_size, start + n))
        gens = image_generators(seed, idx, device)
        x = randn((len(idx), *shape), gens, device=device)
        yield idx, run_sampler(denoiser, x, grid, cfg, generator=gens, callback=callback, **cond)
        bar.update(len(idx))
    bar.close()


def sample(denoiser: Denoiser, n: int, shape: Sequence[int], cfg: SamplerConfig = SamplerConfig(), **kwargs: Any) -> Tensor:
    """``n`` images of ``shape`` (C, H, W) in [-1, 1]; see :func:`sample_batches` for the options."""
    return torch.cat([imgs for _, imgs in sample_batches(denoiser, n, shape, cfg, **kwargs)])
