"""Step grids as data: built once, in float64, always ending at the data end (sigma = 0).

A :class:`Grid` of N steps holds the N model timesteps ``t`` the network is evaluated at
(decreasing) and N + 1 noise levels ``sigma`` (the VE noise level, sigma = sqrt((1 - abar)/abar)),
where ``sigma[i]`` belongs to ``t[i]`` and ``sigma[N] = 0`` is clean data. A sampler moves from
sigma[i] to sigma[i + 1] at step i, so it never has to recompute "the previous timestep" inside a
step (the source of diffusers bugs #11347 and #12633).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from difflab.errors import ConfigError, parse_choice
from difflab.schedule import NoiseSchedule

F64 = torch.float64


class Spacing(str, Enum):
    UNIFORM = "uniform"  # evenly spaced in t
    QUADRATIC = "quadratic"  # t_i ~ i^2: dense near the data end (Song et al. 2021, DDIM appendix)


@dataclass(frozen=True)
class Grid:
    t: Tensor  # (N,) float64 model timesteps, decreasing
    sigma: Tensor  # (N + 1,) float64 VE noise levels, decreasing, sigma[N] == 0

    def __post_init__(self) -> None:
        t, sigma = self.t, self.sigma
        if t.dtype != F64 or sigma.dtype != F64:
            raise ConfigError("grid tensors must be float64")
        if t.ndim != 1 or sigma.shape != (len(t) + 1,) or len(t) == 0:
            raise ConfigError("a grid needs N >= 1 timesteps and N + 1 noise levels")
        if float(sigma[-1]) != 0.0 or not bool((sigma[1:] < sigma[:-1]).all()):
            raise ConfigError("grid noise levels must decrease strictly and end at 0")

    def __len__(self) -> int:
        return len(self.t)

    @property
    def alpha_bar(self) -> Tensor:
        """abar at each grid point (N + 1,), with abar[N] = 1."""
        return 1 / (1 + self.sigma**2)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: Spacing | str = Spacing.UNIFORM) -> Tensor:
    """``steps`` distinct integer timesteps in [0, T - 1], ascending, always including 0 and T - 1."""
    spacing = parse_choice(Spacing, spacing, "timestep spacing")
    T = num_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ConfigError(f"steps must be an integer in [1, {T}], got {steps!r}")
    if steps == 1:
        return torch.tensor([T - 1])
    u = torch.linspace(0, 1, steps, dtype=F64)
    ts = (u if spacing is Spacing.UNIFORM else u**2) * (T - 1)
    ts = ts.round().long()
    # Rounding can merge neighbours near t = 0 for quadratic spacing: push them apart so the
    # grid keeps exactly `steps` distinct entries (possible since steps <= T).
    for i in range(1, steps):
        ts[i] = max(int(ts[i]), int(ts[i - 1]) + 1)
    for i in range(steps - 2, -1, -1):
        ts[i] = min(int(ts[i]), int(ts[i + 1]) - 1)
    return ts


def discrete_grid(schedule: NoiseSchedule, steps: int | None = None, spacing: Spacing | str = Spacing.UNIFORM) -> Grid:
    """Grid over the training timesteps: all T of them, or ``steps`` of them respaced.

    Built through :meth:`NoiseSchedule.respace`, so a DDPM step on this grid is exactly the
    posterior of the respaced process (improved-diffusion ``respace.py``).
    """
    ts = spaced_timesteps(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps, spacing)
    respaced = schedule.respace(ts)
    t = respaced.timestep_map.flip(0)
    sigma = torch.cat([respaced.sigmas.flip(0), torch.zeros(1, dtype=F64)])
    return Grid(t=t, sigma=sigma)
