"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv:2211.01095): 2M (their Algorithm 2), its SDE form, and 3M.

All work in y = x / sqrt(abar) and lambda = -log sigma (see :mod:`difflab.samplers.ve`): over a step
of size h = log(sigma / sigma_next) the probability-flow ODE is solved exactly as
    y_next = e^-h y + integral_0^h e^-(h - v) D(lambda + v) dv,
and the methods differ only in the polynomial in lambda that stands in for the data prediction D,
built from the current and previous steps' D (one network evaluation per step: N steps, N NFE).
Each starts at lower order (no history yet), and the last step, to sigma = 0 (h infinite), is the
first-order step y_next = D, as k-diffusion does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers.base import Callback
from difflab.samplers.grid import Grid
from difflab.samplers.noise import Generators, randn_like
from difflab.samplers.ve import VEModel, report, to_y


def phi(k: int, h: float) -> float:
    """integral_0^h e^-(h - v) v^k / k! dv  (= h^(k+1) phi_(k+1)(-h) in the exponential-integrator
    notation): phi(0) = 1 - e^-h, phi(1) = h - 1 + e^-h, phi(2) = h^2/2 - h + 1 - e^-h. A power series
    for small h, where the closed forms cancel catastrophically."""
    if h < 0.5:
        term, total = h ** (k + 1) / math.factorial(k + 1), 0.0
        for j in range(20):
            total += term
            term *= -h / (k + 2 + j)
        return total
    poly = sum((-1) ** (k - j) * h**j / math.factorial(j) for j in range(k + 1))
    return poly - (-1) ** k * math.exp(-h)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: with r = h_prev / h,
    y_next = e^-h y + (1 - e^-h) ((1 + 1/(2r)) D_i - 1/(2r) D_(i-1)).
    Second order; the first step (no D_(i-1)) and the last (to sigma = 0) are first order.
    It is :func:`sample_dpmpp_2m_sde` at eta = 0 (e^-h = sigma_next / sigma, no noise), and runs as that.
    ``generator`` is unused (deterministic); it is accepted so that every sampler has one signature."""
    return sample_dpmpp_2m_sde(denoiser, x, grid, eta=0.0, generator=generator, callback=callback, **cond)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, eta: float = 1.0, s_noise: float = 1.0,
    generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """SDE-DPM-Solver++(2M): the DPM-Solver++ data-prediction multistep update applied to the reverse
    diffusion SDE instead of the ODE (Lu et al. 2022 and their reference code; the "midpoint" form of
    the second-order correction, also used by diffusers and k-diffusion). With k = (1 + eta) h:

        y_next = e^-k y + (1 - e^-k) (D_i + (h / (2 h_prev)) (D_i - D_(i-1))) + sigma_next sqrt(1 - e^(-2 eta h)) s_noise z.

    With D exact and the correction dropped, y_next has exactly the marginal noise level
    sigma_next for any eta; eta = 1 is the reverse SDE (its first-order step is DDPM's posterior
    sample on the same grid), eta = 0 is the ODE solver :func:`sample_dpmpp_2m`. The last step (to
    sigma = 0) returns D and adds no noise. Noise comes from ``generator`` (per-image streams keep
    images independent of the batch). N steps, N network evaluations."""
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")
    if not s_noise > 0:
        raise ConfigError(f"s_noise must be > 0, got {s_noise}")
    model = VEModel(denoiser, cond)
    sigmas, ts = grid.sigma.tolist(), grid.t.tolist()
    y = to_y(x, sigmas[0])
    d_prev, h_prev = None, None
    for i in range(len(grid)):
        sigma, t, sigma_next = sigmas[i], ts[i], sigmas[i + 1]
        d0 = model(y, sigma, t)
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        if sigma_next == 0:
            y_next = d0
        else:
            k = (1 + eta) * h
            d = d0 if d_prev is None else d0 + (h / (2 * h_prev)) * (d0 - d_prev)
            y_next = math.exp(-k) * y - math.expm1(-k) * d
            if eta > 0:
                y_next = y_next + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * randn_like(y, generator)
        report(callback, i, t, sigma, y, d0, y_next, sigma_next)
        y, d_prev, h_prev = y_next, d0, h
    return y


@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """DPM-Solver++(3M): the third-order multistep member of Lu et al.'s family (the paper's
    Algorithm 2 is 2M; this is the same construction one order up). D is replaced by the quadratic in lambda through
    D_i, D_(i-1), D_(i-2) (Newton form: slopes f01 = (D_i - D_(i-1)) / h_1, f12 = (D_(i-1) - D_(i-2)) / h_2,
    curvature f012 = (f01 - f12) / (h_1 + h_2)), integrated exactly:

        y_next = e^-h y + phi_0(h) D_i + phi_1(h) (f01 + h_1 f012) + 2 phi_2(h) f012,

    with h_1, h_2 the two previous step sizes and phi_k(h) = integral_0^h e^-(h - v) v^k / k! dv
    (:func:`phi`). The first step is first order, the second uses the line through two points
    (phi_1 f01), the last (to sigma = 0) is y_next = D. N steps, N network evaluations."""
    model = VEModel(denoiser, cond)
    sigmas, ts = grid.sigma.tolist(), grid.t.tolist()
    y = to_y(x, sigmas[0])
    hist: list[tuple[Tensor, float]] = []  # (D, step size) of the previous two steps, newest first
    for i in range(len(grid)):
        sigma, t, sigma_next = sigmas[i], ts[i], sigmas[i + 1]
        d0 = model(y, sigma, t)
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        if sigma_next == 0:
            y_next = d0
        else:
            y_next = (sigma_next / sigma) * y + phi(0, h) * d0
            if len(hist) >= 1:
                (d1, h1) = hist[0]
                f01 = (d0 - d1) / h1
                if len(hist) == 2:
                    (d2, h2) = hist[1]
                    f012 = (f01 - (d1 - d2) / h2) / (h1 + h2)
                    y_next = y_next + phi(1, h) * (f01 + h1 * f012) + 2 * phi(2, h) * f012
                else:
                    y_next = y_next + phi(1, h) * f01
        report(callback, i, t, sigma, y, d0, y_next, sigma_next)
        y = y_next
        hist = [(d0, h)] + hist[:1]
    return y
