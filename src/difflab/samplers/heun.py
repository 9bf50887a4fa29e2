"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364,
Algorithm 1; with churn, Algorithm 2)."""
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
def sample_heun(
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
    """Per step sigma -> sigma_next: an Euler predictor y' = y + (sigma_next - sigma) d(y, sigma),
    then the trapezoidal corrector y_next = y + (sigma_next - sigma) (d(y, sigma) + d(y', sigma_next)) / 2,
    with d(y, sigma) = (y - D(y; sigma)) / sigma. The last step (to sigma = 0, where d is undefined)
    is the Euler step alone, as in Algorithm 1. N steps cost 2N - 1 network evaluations.

    ``churn`` > 0 is Algorithm 2: before step i the state is lifted to sigma_hat = sigma (1 +
    gamma_i) with fresh noise, gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma <= S_tmax;
    sigma_hat never exceeds the schedule's sigma_max. Second stages and churned levels evaluate the
    network at the fractional model time t = schedule.t_at_sigma(sigma).
    """
    return karras_sampler(denoiser, x, grid, second_order=True, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise, generator=generator, callback=callback, **cond)

