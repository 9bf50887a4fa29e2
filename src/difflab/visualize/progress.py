"""The reverse process in pictures: record chosen states of a sampler run, draw them as a grid.

A sampler on a grid of N steps passes through N + 1 states: x at the start of each step
(state 0 is the initial noise x_T) and the final sample (state N). :func:`record_trajectory`
keeps ``frames`` of them, evenly spaced in step index, plus the denoiser's prediction of x_0 at
each kept state (for the final state, the sample itself). Images use the same per-image seeds as
``difflab sample``, so the last column of a trajectory is the image ``difflab sample`` writes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers import SamplerConfig, Step, image_generators, make_grid, run_sampler
from difflab.samplers.noise import randn


@dataclass(frozen=True)
class Trajectory:
    """Kept states of one sampler run over ``n`` images.

    ``x[k]`` and ``x0[k]`` (each n x C x H x W, in [-1, 1] up to sampler overshoot) are the state
    and the predicted clean image at kept state k; ``t[k]`` is its model timestep (None for the
    final sample), ``sigma[k]`` its noise level and ``step[k]`` its index among the N + 1 states.
    """

    x: Tensor  # (frames, n, C, H, W)
    x0: Tensor  # (frames, n, C, H, W)
    t: list[float | None]
    sigma: list[float]
    step: list[int]
    num_steps: int
    sampler: SamplerConfig

    @property
    def frames(self) -> int:
        return len(self.step)

    def label(self, k: int) -> str:
        """A short title for kept state k: its timestep (and step number), or 'sample'."""
        if self.t[k] is None:
            return f"x_0 (sample)\nstep {self.num_steps}"
        return f"t={self.t[k]:.0f}\nstep {self.step[k]}"


def frame_indices(num_steps: int, frames: int) -> list[int]:
    """``frames`` distinct state indices in [0, N], evenly spaced, always with 0 (x_T) and N (sample)."""
    if frames < 2:
        raise ConfigError(f"--frames must be at least 2 (x_T and the sample), got {frames}")
    frames = min(frames, num_steps + 1)
    idx = [round(k * num_steps / (frames - 1)) for k in range(frames)]
    return sorted(set(idx))


@torch.no_grad()
def record_trajectory(
    denoiser: Denoiser, n: int, shape: Sequence[int], cfg: SamplerConfig, *, frames: int = 20, seed: int = 0,
    start: int = 0, progress: bool = True, **cond: Any,
) -> Trajectory:
    """Run the sampler on images ``start .. start + n - 1`` (seeds as in ``difflab sample``) and keep
    ``frames`` of its states (see the module docstring). ``cond``: the network's condition keywords,
    each with ``n`` rows (e.g. ``lowres``, the image a segmentation run segments)."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    grid = make_grid(denoiser.schedule, cfg)
    N = len(grid)
    keep = frame_indices(N, frames)
    wanted = set(keep)
    xs: dict[int, Tensor] = {}
    x0s: dict[int, Tensor] = {}
    bar = tqdm(total=N, desc=f"{cfg.sampler.value} {N} steps", unit="step", disable=not progress)

    def callback(s: Step) -> None:
        if s.i in wanted:
            xs[s.i], x0s[s.i] = s.x.float().clone(), s.x0.float().clone()
        bar.update(1)

    idx = range(start, start + n)
    gens = image_generators(seed, idx)
    x = randn((n, *shape), gens, device=denoiser.device)
    out = run_sampler(denoiser, x, grid, cfg, generator=gens, callback=callback, **cond).float()
    bar.close()
    xs[N], x0s[N] = out, out
    t = [float(grid.t[i]) if i < N else None for i in keep]
    return Trajectory(x=torch.stack([xs[i] for i in keep]), x0=torch.stack([x0s[i] for i in keep]), t=t,
                      sigma=[float(grid.sigma[i]) for i in keep], step=keep, num_steps=N, sampler=cfg)


def sampler_name(cfg: SamplerConfig, num_steps: int) -> str:
    name = f"{cfg.sampler.value.upper()}, {num_steps} steps"
    return name + (f", eta={cfg.eta:g}" if cfg.eta else "")


def progress_figure(traj: Trajectory, *, show_x0: bool = True, cell: int | None = None):
    """Rows = images, columns = kept states from x_T to x_0; a second panel shows the predicted x_0."""
    from difflab.data.dataset import to_uint8
    from difflab.visualize.figure import image_grid_figure

    panels = [to_uint8(traj.x.transpose(0, 1))]
    name = sampler_name(traj.sampler, traj.num_steps)
    titles = [f"x_t ({name})"]
    if show_x0:
        panels.append(to_uint8(traj.x0.transpose(0, 1)))
        titles.append("predicted x_0 at each step")
    n = panels[0].shape[0]
    return image_grid_figure(panels, titles=[traj.label(k) for k in range(traj.frames)], panel_titles=titles,
                             row_titles=[f"image {i + 1}" for i in range(n)], cell=cell)
