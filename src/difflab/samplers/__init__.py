"""Samplers: pure functions of (denoiser, x, grid, generator, callback), plus the driver that
turns a trained denoiser into N images with one seed per image.

| sampler        | method                                              | order | NFE for N steps |
| -------------- | --------------------------------------------------- | ----- | --------------- |
| ``ddpm``       | ancestral (Ho et al. 2020, Alg. 2), any grid        | SDE   | N               |
| ``ddim``       | DDIM (Song et al. 2021), eta in [0, 1]              | 1     | N               |
| ``euler``      | Euler on the PF-ODE (Karras et al. 2022, Alg. 2)    | 1     | N               |
| ``heun``       | Heun (Karras et al. 2022, Alg. 1; churn: Alg. 2)    | 2     | 2N - 1          |
| ``dpmpp-2m``   | DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)           | 2     | N               |
| ``dpmpp-2m-sde`` | SDE-DPM-Solver++(2M)                              | SDE   | N               |
| ``dpmpp-3m``   | DPM-Solver++(3M)                                    | 3     | N               |

Every grid ends with a first-order step from the schedule's sigma_min (t = 0) to sigma = 0.
"""
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
from difflab.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from difflab.samplers.euler import sample_euler
from difflab.samplers.grid import (
    Grid, GridKind, Spacing, build_grid, discrete_grid, karras_sigmas, log_snr_sigmas, sigma_grid, spaced_timesteps,
)
from difflab.samplers.heun import sample_heun
from difflab.samplers.noise import Generators, image_generators, image_seed, randn
from difflab.schedule import NoiseSchedule, VarianceType

__all__ = [
    "Grid", "GridKind", "SamplerConfig", "SamplerKind", "Spacing", "Step", "build_grid", "discrete_grid",
    "image_generators", "image_seed", "karras_sigmas", "log_snr_sigmas", "make_grid", "nfe", "run_sampler",
    "sample", "sample_batches", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m", "sample_euler", "sample_heun", "sigma_grid", "spaced_timesteps",
]


class SamplerKind(str, Enum):
    DDPM = "ddpm"
    DDIM = "ddim"
    EULER = "euler"
    HEUN = "heun"
    DPMPP_2M = "dpmpp-2m"
    DPMPP_2M_SDE = "dpmpp-2m-sde"
    DPMPP_3M = "dpmpp-3m"


_CHURN_SAMPLERS = (SamplerKind.EULER, SamplerKind.HEUN)

# The grid a sampler uses when none is asked for: the classic integer grid for DDPM and DDIM (as
# before), Karras et al.'s rho = 7 sigmas for their Euler and Heun samplers, and even steps in
# log-SNR for DPM-Solver++, whose step size h is the log-SNR step (tests/test_samplers_fast.py
# measures every sampler on every grid).
DEFAULT_GRID = {
    SamplerKind.DDPM: GridKind.UNIFORM, SamplerKind.DDIM: GridKind.UNIFORM,
    SamplerKind.EULER: GridKind.KARRAS, SamplerKind.HEUN: GridKind.KARRAS,
    SamplerKind.DPMPP_2M: GridKind.LOG_SNR, SamplerKind.DPMPP_2M_SDE: GridKind.LOG_SNR,
    SamplerKind.DPMPP_3M: GridKind.LOG_SNR,
}


def nfe(sampler: SamplerKind | str, steps: int) -> int:
    """Network evaluations that ``steps`` steps of ``sampler`` cost (Heun: 2N - 1, others N)."""
    sampler = parse_choice(SamplerKind, sampler, "sampler")
    return 2 * steps - 1 if sampler is SamplerKind.HEUN else steps


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler, on which grid. ``steps=None`` means every training timestep.

    ``grid`` is the grid kind; None picks the sampler's default (:data:`DEFAULT_GRID`, or
    ``spacing`` when that is quadratic). ``spacing`` is the older uniform|quadratic switch, kept so
    existing configs and ``--spacing`` still work. ``churn`` is Karras et al.'s S_churn (euler,
    heun). ``trailing`` leaves out the grid's network call at t = 0 (:func:`build_grid`).
    :attr:`grid_kind` is the resolved kind and :meth:`nfe` the cost in network evaluations.
    """

    sampler: SamplerKind = SamplerKind.DDIM
    steps: int | None = 50
    eta: float = 0.0
    spacing: Spacing = Spacing.UNIFORM
    variance: VarianceType = VarianceType.FIXED_SMALL
    grid: GridKind | None = None
    churn: float = 0.0
    trailing: bool = False  # the grid of steps + 1 points without its t = 0 call (see samplers.grid)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", parse_choice(SamplerKind, self.sampler, "sampler"))
        object.__setattr__(self, "spacing", parse_choice(Spacing, self.spacing, "timestep spacing"))
        object.__setattr__(self, "variance", parse_choice(VarianceType, self.variance, "variance type"))
        if self.grid is not None:
            object.__setattr__(self, "grid", parse_choice(GridKind, self.grid, "grid kind"))
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"--steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"--eta must be in [0, 1], got {self.eta}")
        if self.eta != 0.0 and self.sampler is not SamplerKind.DDIM:
            raise ConfigError(f"--eta applies to the ddim sampler only, not {self.sampler.value}")
        if not self.churn >= 0.0:
            raise ConfigError(f"--churn must be >= 0, got {self.churn}")
        if self.churn != 0.0 and self.sampler not in _CHURN_SAMPLERS:
            raise ConfigError(f"--churn applies to the euler and heun samplers only, not {self.sampler.value}")
        if not isinstance(self.trailing, bool):
            raise ConfigError(f"trailing must be true or false, got {self.trailing!r}")
        if self.grid is not None and self.spacing is Spacing.QUADRATIC and self.grid is not GridKind.QUADRATIC:
            raise ConfigError(f"--spacing quadratic contradicts --grid-kind {self.grid.value}; give --grid-kind only")

    @property
    def grid_kind(self) -> GridKind:
        if self.grid is not None:
            return self.grid
        if self.spacing is Spacing.QUADRATIC:
            return GridKind.QUADRATIC
        return DEFAULT_GRID[self.sampler]

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations per image for a model with ``num_timesteps`` training timesteps."""
        return nfe(self.sampler, num_timesteps if self.steps is None else self.steps)

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


def make_grid(schedule: NoiseSchedule, cfg: SamplerConfig) -> Grid:
    """The grid of ``cfg`` for ``schedule``: integer timesteps (at most T) for uniform and
    quadratic, fractional ones (any number) for log-snr and karras."""
    kind = cfg.grid_kind
    if not kind.in_sigma and cfg.steps is not None and cfg.steps > schedule.num_timesteps:
        raise ConfigError(f"--steps {cfg.steps} exceeds the model's {schedule.num_timesteps} training timesteps")
    return build_grid(schedule, cfg.steps, kind, trailing=cfg.trailing)


@torch.no_grad()
def run_sampler(
    denoiser: Denoiser, x: Tensor, grid: Grid, cfg: SamplerConfig, *,
    generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """Run the sampler of ``cfg`` from the VP state ``x`` at grid.t[0] down to data."""
    kw: dict[str, Any] = dict(generator=generator, callback=callback, **cond)
    kind = cfg.sampler
    if kind is SamplerKind.DDPM:
        return sample_ddpm(denoiser, x, grid, variance=cfg.variance, **kw)
    if kind is SamplerKind.DDIM:
        return sample_ddim(denoiser, x, grid, eta=cfg.eta, **kw)
    if kind is SamplerKind.EULER:
        return sample_euler(denoiser, x, grid, churn=cfg.churn, **kw)
    if kind is SamplerKind.HEUN:
        return sample_heun(denoiser, x, grid, churn=cfg.churn, **kw)
    if kind is SamplerKind.DPMPP_2M:
        return sample_dpmpp_2m(denoiser, x, grid, **kw)
    if kind is SamplerKind.DPMPP_2M_SDE:
        return sample_dpmpp_2m_sde(denoiser, x, grid, **kw)
    return sample_dpmpp_3m(denoiser, x, grid, **kw)


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
