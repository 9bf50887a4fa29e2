"""From a denoiser to images: :class:`SamplerConfig` (which sampler, on which grid), the driver
:func:`run_sampler` that looks the sampler up in :data:`~difflab.samplers.registry.SAMPLERS`, and
:func:`sample_batches` / :func:`sample`, which give image k the seed (seed, k)."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.conditioning import take
from difflab.denoiser import Denoiser
from difflab.errors import ConfigError, parse_choice
from difflab.samplers.base import Callback
from difflab.samplers.grid import Grid, GridKind, Spacing, build_grid
from difflab.samplers.noise import Generators, image_generators, randn
from difflab.samplers.registry import SAMPLERS, Option, SamplerKind, samplers_taking
from difflab.schedule import NoiseSchedule, VarianceType

# the value of each sampler option that means "not used", so a sampler that lacks it accepts it
_OPTION_OFF: dict[Option, Any] = {"eta": 0.0, "churn": 0.0, "variance": VarianceType.FIXED_SMALL}


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler, on which grid. ``steps=None`` means every training timestep.

    ``grid`` is the grid kind; None picks the sampler's default (its registry row, or ``spacing``
    when that is quadratic). ``spacing`` is the older uniform|quadratic switch, kept so existing
    configs and ``--spacing`` still work. ``eta`` (ddim), ``churn`` (Karras et al.'s S_churn; euler,
    heun) and ``variance`` (ddpm) are sampler options, refused by samplers that lack them.
    ``trailing`` leaves out the grid's network call at t = 0 (:func:`build_grid`). :attr:`grid_kind`
    is the resolved kind and :meth:`nfe` the cost in network evaluations.
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
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"--steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"--eta must be in [0, 1], got {self.eta}")
        if not self.churn >= 0.0:
            raise ConfigError(f"--churn must be >= 0, got {self.churn}")
        takes = SAMPLERS[self.sampler].options
        for option, off in _OPTION_OFF.items():
            if getattr(self, option) != off and option not in takes:
                names = [k.value for k in samplers_taking(option)]
                which = f"the {' and '.join(names)} sampler{'s' if len(names) > 1 else ''}"
                raise ConfigError(f"--{option} applies to {which} only, not {self.sampler.value}")
        if not isinstance(self.trailing, bool):
            raise ConfigError(f"trailing must be true or false, got {self.trailing!r}")
        if self.grid is not None and self.spacing is Spacing.QUADRATIC and self.grid is not GridKind.QUADRATIC:
            raise ConfigError(f"--spacing quadratic contradicts --grid-kind {self.grid.value}; give --grid-kind only")

    @classmethod
    def default_for(cls, sampler: SamplerKind | str, **options: Any) -> SamplerConfig:
        """``sampler`` with its registry defaults (e.g. ddpm: every training timestep, others 50 steps),
        then ``options``; ``steps=None`` in ``options`` also means the sampler's default."""
        kind = parse_choice(SamplerKind, sampler, "sampler")
        if options.get("steps") is None:
            options["steps"] = SAMPLERS[kind].default_steps
        return cls(sampler=kind, **options)

    @property
    def grid_kind(self) -> GridKind:
        if self.grid is not None:
            return self.grid
        if self.spacing is Spacing.QUADRATIC:
            return GridKind.QUADRATIC
        return SAMPLERS[self.sampler].grid

    def num_steps(self, num_timesteps: int) -> int:
        """Grid steps for a model with ``num_timesteps`` training timesteps."""
        return num_timesteps if self.steps is None else self.steps

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations per image for a model with ``num_timesteps`` training timesteps."""
        return SAMPLERS[self.sampler].nfe(self.num_steps(num_timesteps))


def start_timestep(schedule: NoiseSchedule, strength: float) -> int | None:
    """The integer timestep SDEdit starts from at ``strength`` (round(strength (T - 1))); None for
    strength 1 (the whole grid, from pure noise)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength must be a number in [0, 1], got {strength!r}")
    return None if strength == 1.0 else round(strength * (schedule.num_timesteps - 1))


def make_grid(schedule: NoiseSchedule, cfg: SamplerConfig, strength: float = 1.0) -> Grid:
    """The grid of ``cfg`` for ``schedule``: integer timesteps (at most T) for uniform and
    quadratic, fractional ones (any number) for log-snr and karras. ``strength`` < 1 starts it at
    :func:`start_timestep` (SDEdit), spaced the same way over the shorter range; an integer grid
    then has at most that many steps (fewer timesteps exist)."""
    kind = cfg.grid_kind
    if not kind.in_sigma and cfg.steps is not None and cfg.steps > schedule.num_timesteps:
        raise ConfigError(f"--steps {cfg.steps} exceeds the model's {schedule.num_timesteps} training timesteps")
    t_start = start_timestep(schedule, strength)
    steps, trailing = cfg.steps, cfg.trailing
    if t_start == 0:  # one step, from the least noisy training timestep to data
        steps, trailing = 1, False
    elif t_start is not None and not kind.in_sigma:
        steps = min(steps or schedule.num_timesteps, t_start + 1 - int(trailing))
    return build_grid(schedule, steps, kind, trailing=trailing, t_start=t_start)


@torch.no_grad()
def run_sampler(
    denoiser: Denoiser, x: Tensor, grid: Grid, cfg: SamplerConfig, *,
    generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """Run the sampler of ``cfg`` from the VP state ``x`` at grid.t[0] down to data."""
    entry = SAMPLERS[cfg.sampler]
    options = {name: getattr(cfg, name) for name in entry.options}
    return entry.fn(denoiser, x, grid, generator=generator, callback=callback, **options, **cond)


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
    init: Tensor | None = None,
    strength: float = 1.0,
    stream: int = 0,
    **cond: Any,
) -> Iterator[tuple[range, Tensor]]:
    """Yield (image indices, images in [-1, 1]) batch by batch; image k uses seed (seed, k) (and
    ``stream``, :func:`~difflab.samplers.noise.image_seed`).

    ``cond`` (:mod:`difflab.conditioning`): tensors with ``n`` rows give each image its own condition
    (row i for image ``start + i``); tensors with one row apply to every image.

    SDEdit (Meng et al. 2021, arXiv:2108.01073): with ``init`` (images in [-1, 1], ``n`` rows or one)
    and ``strength`` s < 1, image k starts from its input noised by the forward process to timestep
    round(s (T - 1)), x = sqrt(abar) init + sqrt(1 - abar) z with z the image's own first noise draw,
    and the sampler runs its grid from there (:func:`make_grid`). s = 0 returns the input unchanged;
    s = 1 ignores it: the same images as plain sampling with the same seed."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if init is not None and (tuple(init.shape[1:]) != tuple(shape) or init.shape[0] not in (1, n)):
        raise ConfigError(f"SDEdit inputs of shape {tuple(init.shape)} do not fit {n} images of shape {tuple(shape)}")
    grid = make_grid(denoiser.schedule, cfg, strength if init is not None else 1.0)
    abar = float(grid.alpha_bar[0])
    bar = tqdm(total=n, desc=f"sampling {cfg.sampler.value}", unit="img", disable=not progress)
    for lo in range(start, start + n, batch_size):
        idx = range(lo, min(lo + batch_size, start + n))
        gens = image_generators(seed, idx, stream)
        x = randn((len(idx), *shape), gens, device=device)
        rows = {k: v.to(device) for k, v in take(cond, slice(lo - start, lo - start + len(idx)), n).items()}
        if init is not None and strength < 1.0:
            x0 = take({"init": init}, slice(lo - start, lo - start + len(idx)), n)["init"].to(device, x.dtype)
            if strength == 0.0:
                yield idx, x0.clone()
                bar.update(len(idx))
                continue
            x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * x
        yield idx, run_sampler(denoiser, x, grid, cfg, generator=gens, callback=callback, **rows)
        bar.update(len(idx))
    bar.close()


def sample(denoiser: Denoiser, n: int, shape: Sequence[int], cfg: SamplerConfig = SamplerConfig(), **kwargs: Any) -> Tensor:
    """``n`` images of ``shape`` (C, H, W) in [-1, 1]; see :func:`sample_batches` for the options."""
    return torch.cat([imgs for _, imgs in sample_batches(denoiser, n, shape, cfg, **kwargs)])
