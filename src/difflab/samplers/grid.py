"""Step grids as data: built once, in float64, always ending at the data end (sigma = 0).

A :class:`Grid` of N steps holds the N model timesteps ``t`` the network is evaluated at
(decreasing) and N + 1 noise levels ``sigma`` (the VE noise level, sigma = sqrt((1 - abar)/abar)),
where ``sigma[i]`` belongs to ``t[i]`` and ``sigma[N] = 0`` is clean data. A sampler moves from
sigma[i] to sigma[i + 1] at step i, so it never has to recompute "the previous timestep" inside a
step (the source of diffusers bugs #11347 and #12633).

Grid kinds (:class:`GridKind`) for a model trained on the discrete timesteps t = 0..T-1:

- ``uniform``: integer timesteps evenly spaced in t (respaced; DDIM's and DDPM's classic grid);
- ``quadratic``: integer timesteps with t_i ~ i^2, dense near the data end;
- ``log-snr``: sigmas evenly spaced in log-SNR = -2 log sigma between the schedule's sigma_max and
  sigma_min (the step size h of DPM-Solver is then constant; Lu et al. 2022);
- ``karras``: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
  rho = 7 (Karras et al. 2022, arXiv:2206.00364, eq. 5).

The sigma-defined kinds place steps between training timesteps: t = schedule.t_at_sigma(sigma),
the log-sigma interpolation of k-diffusion's discrete-model wrapper, so t is fractional. Every
kind starts at t = T - 1 (sigma_max), visits t = 0 (sigma_min) last and then steps to sigma = 0.

``trailing=True`` builds the kind's grid of N + 1 points and drops its last one (t = 0): the N
network calls then cover the whole range and the last step goes from the second-lowest point
straight to sigma = 0 (the "trailing" spacing of Lin et al. 2024, "Common Diffusion Noise Schedules
and Sample Steps are Flawed", arXiv:2305.08891, sec. 3.4, here for every kind). At t = 0 the input is
data to within sigma_min (0.01 for DDPM's linear schedule), so the call there is nearly wasted,
which costs most at 5-10 steps.
"""
from __future__ import annotations

import math
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


class GridKind(str, Enum):
    """How the N steps of a grid are placed (see the module docstring)."""

    UNIFORM = "uniform"  # integer t, evenly spaced (Spacing.UNIFORM)
    QUADRATIC = "quadratic"  # integer t, t_i ~ i^2 (Spacing.QUADRATIC)
    LOG_SNR = "log-snr"  # sigma evenly spaced in log-SNR
    KARRAS = "karras"  # Karras et al. 2022, rho = 7

    @property
    def in_sigma(self) -> bool:
        """True for the kinds defined by their sigmas (fractional t)."""
        return self in (GridKind.LOG_SNR, GridKind.KARRAS)


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


def discrete_grid(schedule: NoiseSchedule, steps: int | None = None, spacing: Spacing | str = Spacing.UNIFORM,
                  t_start: int | None = None) -> Grid:
    """Grid over the training timesteps: all T of them, or ``steps`` of them respaced; with
    ``t_start`` over 0 ... t_start only (a grid that starts part-way, for SDEdit).

    Built through :meth:`NoiseSchedule.respace`, so a DDPM step on this grid is exactly the
    posterior of the respaced process (improved-diffusion ``respace.py``). The noise levels are read
    from the schedule's own table (the respaced schedule's cumprod reproduces them only to ~1e-8
    relative where abar is tiny, e.g. at the end of the cosine schedule).
    """
    top = schedule.num_timesteps if t_start is None else t_start + 1
    ts = spaced_timesteps(top, top if steps is None else steps, spacing)
    respaced = schedule.respace(ts)
    t = respaced.timestep_map.flip(0)
    sigma = torch.cat([schedule.sigmas[ts].flip(0), torch.zeros(1, dtype=F64)])
    return Grid(t=t, sigma=sigma)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``steps`` decreasing sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, eq. 5), in float64, with both ends exact."""
    _check_sigma_range(steps, sigma_min, sigma_max)
    if rho <= 0:
        raise ConfigError(f"karras grid needs rho > 0, got {rho}")
    if steps == 1:
        return torch.tensor([sigma_max], dtype=F64)
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def log_snr_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``steps`` decreasing sigmas from sigma_max to sigma_min, evenly spaced in log-SNR
    (log-SNR = -2 log sigma), in float64, with both ends exact."""
    _check_sigma_range(steps, sigma_min, sigma_max)
    if steps == 1:
        return torch.tensor([sigma_max], dtype=F64)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=F64).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def _check_sigma_range(steps: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


def sigma_grid(schedule: NoiseSchedule, sigmas: Tensor) -> Grid:
    """The grid visiting the decreasing noise levels ``sigmas`` (then sigma = 0) of a discrete-time
    model: t = schedule.t_at_sigma(sigma), fractional, interpolating log-sigma. Noise levels must lie
    in the schedule's range [sigma_min, sigma_max]; the ends map exactly to t = T - 1 and t = 0."""
    sigmas = torch.as_tensor(sigmas, dtype=F64)
    lo, hi = schedule.sigma_min, schedule.sigma_max
    if sigmas.ndim != 1 or len(sigmas) == 0 or float(sigmas.max()) > hi or float(sigmas.min()) < lo:
        raise ConfigError(f"grid noise levels must lie in the model's range [{lo:.4g}, {hi:.4g}]")
    t = schedule.t_at_sigma(sigmas)
    t = torch.where(sigmas == hi, torch.full_like(t, schedule.num_timesteps - 1), t)
    t = torch.where(sigmas == lo, torch.zeros_like(t), t)
    return Grid(t=t, sigma=torch.cat([sigmas, torch.zeros(1, dtype=F64)]))


def build_grid(schedule: NoiseSchedule, steps: int | None = None, kind: GridKind | str = GridKind.UNIFORM, *,
               rho: float = 7.0, trailing: bool = False, t_start: int | None = None) -> Grid:
    """A grid of ``steps`` steps (None: one per training timestep) of the given kind.

    ``uniform`` and ``quadratic`` are :func:`discrete_grid` (integer timesteps, at most T of them);
    ``log-snr`` and ``karras`` run from the schedule's sigma_max (t = T - 1) to its sigma_min
    (t = 0) and may have any number of steps. ``trailing``: the grid of ``steps + 1`` points without
    its last (see the module docstring). ``t_start`` (an integer timestep) starts the grid there
    instead of at T - 1, with the same kind of spacing over the shorter range (SDEdit); a discrete
    grid then has at most t_start + 1 steps.
    """
    kind = parse_choice(GridKind, kind, "grid kind")
    top = schedule.num_timesteps - 1 if t_start is None else t_start
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top < schedule.num_timesteps:
        raise ConfigError(f"a grid's start must be an integer timestep in [0, {schedule.num_timesteps - 1}], got {t_start!r}")
    n = top + 1 if steps is None else steps
    if trailing:
        if kind.in_sigma or n + 1 <= top + 1:
            full = build_grid(schedule, n + 1, kind, rho=rho, t_start=t_start)
            return Grid(t=full.t[:-1], sigma=torch.cat([full.sigma[:-2], full.sigma[-1:]]))
        raise ConfigError(f"a trailing {kind.value} grid needs steps < {top + 1} (one timestep is left out)")
    if not kind.in_sigma:
        if steps is not None and steps > top + 1:
            raise ConfigError(f"steps must be an integer in [1, {top + 1}], got {steps!r}")
        return discrete_grid(schedule, steps, Spacing(kind.value), t_start=t_start)
    if top == 0:
        if n != 1:
            raise ConfigError(f"a grid starting at t = 0 has one step, not {n}")
        return sigma_grid(schedule, torch.tensor([schedule.sigma_min], dtype=F64))
    sigma_top = float(schedule.sigmas[top])
    if kind is GridKind.KARRAS:
        sigmas = karras_sigmas(n, schedule.sigma_min, sigma_top, rho)
    else:
        sigmas = log_snr_sigmas(n, schedule.sigma_min, sigma_top)
    grid = sigma_grid(schedule, sigmas)
    if t_start is not None:  # the start is exactly the integer timestep (not a log-sigma round trip)
        grid = Grid(t=torch.cat([torch.tensor([float(top)], dtype=F64), grid.t[1:]]), sigma=grid.sigma)
    return grid
