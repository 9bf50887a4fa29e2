"""Inpainting by replacement with RePaint's resampling (Lugmayr et al. 2022, arXiv:2201.09865).

At every step of the grid the known region (mask False) is replaced by the input noised by the
forward process to that step's noise level, so only the masked region is generated; at sigma = 0 the
known pixels are the input's, exactly. Replacement alone harmonises poorly: the generated region
never sees what the known one will become. RePaint's resampling fixes that: at every ``jump``-th
grid point the state is noised back ``jump`` points by the forward process and denoised again,
``resample`` times in all, so the two regions agree. Its schedule (:func:`repaint_path`) is the one
of the paper's code (``get_schedule_jump``), on difflab's grid indices.

Each step is a DDIM step (eta = 1 is DDPM's ancestral step on the same grid, RePaint's sampler;
eta = 0 is deterministic between resamplings); the one-step samplers' shared step function
(:func:`difflab.samplers.ddim.ddim_step`) does the work. Multistep solvers keep a history that a
jump back would invalidate, so inpainting takes ``ddpm`` or ``ddim`` only.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.conditioning import Cond, take
from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers.base import Callback, Step
from difflab.samplers.ddim import ddim_step
from difflab.samplers.grid import Grid
from difflab.samplers.noise import Generators, image_generators, randn
from difflab.samplers.registry import SamplerKind
from difflab.samplers.run import SamplerConfig, make_grid
from difflab.schedule import VarianceType

#: RePaint's sampler (DDPM's ancestral step) on a 50-step grid
DEFAULT_SAMPLER = SamplerConfig(sampler=SamplerKind.DDPM, steps=50)


def repaint_path(steps: int, jump: int, resample: int) -> list[tuple[int, int]]:
    """Moves over grid indices 0 (noisiest) ... ``steps`` (data): (i, i + 1) denoises one step,
    (i, i - jump) noises back. At indices steps - 1, steps - 1 - jump, ... (those >= jump) the walk
    jumps back ``resample - 1`` times; ``resample = 1`` is the plain grid."""
    for value, what in ((steps, "steps"), (jump, "--jump"), (resample, "--resample")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    left = {i: resample - 1 for i in range(steps - 1, jump - 1, -jump)} if jump < steps else {}
    moves, i = [], 0
    while i < steps:
        moves.append((i, i + 1))
        i += 1
        if left.get(i, 0) > 0:
            left[i] -= 1
            moves.append((i, i - jump))
            i -= jump
    return moves


def _inpaint(denoiser: Denoiser, grid: Grid, path: list[tuple[int, int]], known: Tensor, regen: Tensor, eta: float,
             gens: Generators, cond: Cond, callback: Callback = None) -> Tensor:
    """One batch along ``path``: see the module docstring. ``callback`` sees each denoising move, its
    ``i`` counting the moves made (0 ... :func:`network_calls` - 1), not the grid point."""
    abar, shape, device = grid.alpha_bar.tolist(), known.shape, known.device

    def noised(level: int) -> Tensor:  # the input at grid point `level`, a fresh forward-process draw
        if abar[level] == 1.0:
            return known
        return math.sqrt(abar[level]) * known + math.sqrt(1 - abar[level]) * randn(shape, gens, device=device)

    x = torch.where(regen, randn(shape, gens, device=device), noised(0))
    moves = 0
    for i, j in path:
        if j == i + 1:
            out = denoiser.predict(x, float(grid.t[i]), **cond)
            x_next = torch.where(regen, ddim_step(x, out.x0, out.eps, abar[i], abar[j], eta, gens), noised(j))
            if callback is not None:
                callback(Step(moves, float(grid.t[i]), float(grid.sigma[i]), x, out.x0, x_next))
            x, moves = x_next, moves + 1
        else:  # back to grid point j by the forward process q(x_j | x_i)
            r = abar[j] / abar[i]
            x = math.sqrt(r) * x + math.sqrt(1 - r) * randn(shape, gens, device=device)
    return torch.where(regen, x, known)


def network_calls(steps: int, jump: int, resample: int) -> int:
    """Denoising steps (= network evaluations per image, without guidance) of :func:`repaint_path`."""
    return sum(1 for i, j in repaint_path(steps, jump, resample) if j == i + 1)


@torch.no_grad()
def inpaint_batches(
    denoiser: Denoiser,
    images: Tensor,
    mask: Tensor,
    n: int,
    cfg: SamplerConfig = DEFAULT_SAMPLER,
    *,
    jump: int = 5,
    resample: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callback = None,
    **cond: Any,
) -> Iterator[tuple[range, Tensor]]:
    """Yield (image indices, images in [-1, 1]); image k uses seed (seed, k), whatever the batch.

    ``images`` (n or 1 rows) in [-1, 1] and ``mask`` (n or 1 rows, one channel or all; True =
    regenerate). ``cond`` as in :func:`difflab.samplers.sample_batches`. ``cfg`` must be ddpm or ddim.
    ``callback`` sees every denoising move of each batch (:func:`network_calls` per batch)."""
    if cfg.sampler not in (SamplerKind.DDPM, SamplerKind.DDIM):
        raise ConfigError(f"inpainting takes --sampler ddpm or ddim (RePaint jumps back, which a multistep solver's "
                          f"history does not survive), not {cfg.sampler.value}")
    if cfg.variance is not VarianceType.FIXED_SMALL:
        raise ConfigError("inpainting's DDPM step is DDIM's eta = 1 step, with the fixed-small variance; drop --variance")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"-n and --batch-size must be at least 1, got {n} and {batch_size}")
    if images.shape[0] not in (1, n) or mask.shape[0] not in (1, n):
        raise ConfigError(f"{images.shape[0]} images and {mask.shape[0]} masks for {n} outputs")
    if mask.dtype != torch.bool or mask.shape[-2:] != images.shape[-2:] or mask.shape[1] not in (1, images.shape[1]):
        raise ConfigError(f"a mask must be bool (N, 1 or C, H, W) of the images' size, got {mask.dtype} {tuple(mask.shape)}")
    eta = 1.0 if cfg.sampler is SamplerKind.DDPM else cfg.eta
    grid = make_grid(denoiser.schedule, cfg)
    path = repaint_path(len(grid), jump, resample)
    bar = tqdm(total=n, desc=f"inpainting {cfg.sampler.value}", unit="img", disable=not progress)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        rows = slice(lo, lo + len(idx))
        gens = image_generators(seed, idx)
        known = take({"x": images}, rows, n)["x"].to(device)
        regen = take({"m": mask}, rows, n)["m"].to(device)
        x = _inpaint(denoiser, grid, path, known, regen, eta, gens, {k: v.to(device) for k, v in take(cond, rows, n).items()},
                     callback)
        yield idx, x
        bar.update(len(idx))
    bar.close()
