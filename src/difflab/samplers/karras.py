"""Karras et al.'s Algorithm 2 loop (arXiv:2206.00364): optional churn, an Euler step on the
probability-flow ODE and, for Heun, the trapezoidal correction. :func:`difflab.samplers.euler.sample_euler`
and :func:`difflab.samplers.heun.sample_heun` are this loop with and without the second stage."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.base import Callback
from difflab.samplers.grid import Grid
from difflab.samplers.noise import Generators
from difflab.samplers.ve import VEModel, check_churn, churn_gamma, lift_noise, report, to_y


def karras_sampler(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, second_order: bool, churn: float, s_tmin: float, s_tmax: float,
    s_noise: float, generator: Generators, callback: Callback, **cond: Any,
) -> Tensor:
    """Per step sigma -> sigma_next: churn (lift to sigma_hat), the Euler step
    y_next = y + (sigma_next - sigma_hat) d(y, sigma_hat) with d(y, sigma) = (y - D(y; sigma)) / sigma,
    and with ``second_order`` Heun's correction y_next = y + (sigma_next - sigma_hat) (d0 + d1) / 2
    (skipped on the last step, to sigma = 0, where d is undefined)."""
    check_churn(churn, s_tmin, s_tmax, s_noise)
    model, n = VEModel(denoiser, cond), len(grid)
    sigmas, ts = grid.sigma.tolist(), grid.t.tolist()
    y = to_y(x, sigmas[0])
    for i in range(n):
        sigma, t, sigma_next = sigmas[i], ts[i], sigmas[i + 1]
        gamma = churn_gamma(churn, n, sigma, s_tmin, s_tmax)
        y, sigma_hat = lift_noise(y, sigma, gamma, denoiser.schedule.sigma_max, s_noise, generator)
        t_hat = t if sigma_hat == sigma else model.t_at(sigma_hat)
        d0 = model(y, sigma_hat, t_hat)
        y_next = d0 + (sigma_next / sigma_hat) * (y - d0)  # Euler: y + (sigma_next - sigma_hat) d
        if second_order and sigma_next > 0:
            d1 = model(y_next, sigma_next, ts[i + 1])
            dy = (y - d0) / sigma_hat
            y_next = y + (sigma_next - sigma_hat) * 0.5 * (dy + (y_next - d1) / sigma_next)
        report(callback, i, t_hat, sigma_hat, y, d0, y_next, sigma_next)
        y = y_next
    return y
