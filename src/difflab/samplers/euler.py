"""Euler's method on the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364, Algorithm 2
with Euler steps only; with churn = 0 it is the deterministic sampler of their sec. 3)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.base import Callback
from difflab.samplers.grid import Grid
from difflab.samplers.karras import karras_sampler
from difflab.samplers.noise import Generators


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generators = None,
    callback: Callback = None,
    **cond: Any,
) -> Tensor:
    """y_next = y + (sigma_next - sigma) (y - D(y; sigma)) / sigma at each grid step; N steps cost
    N network evaluations.

    First order. In y = x / sqrt(abar) this step equals (sigma_next/sigma) y + (1 - sigma_next/sigma) D,
    which is exactly deterministic DDIM on the same grid (Song et al. 2021; Karras et al. sec. 4) and
    first-order DPM-Solver++. ``churn`` > 0 adds Algorithm 2's noise injection (S_churn,
    applied where S_tmin <= sigma <= S_tmax, scaled by S_noise) before each step's evaluation.
    """
    return karras_sampler(denoiser, x, grid, second_order=False, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise, generator=generator, callback=callback, **cond)
