"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv:2211.01095): 2M (their Algorithm 2), its SDE form, and 3M.

All work in y = x / sqrt(abar) and lambda = -log sigma (see :mod:`difflab.samplers.ve`): over a step
of size h = log(sigma / sigma_next) the probability-flow ODE is solved exactly as
    y_next = e^-h y + integral_0^h e^-(h - v) D(lambda + v) dv,
and the methods differ only in the polynomial in lambda that stands in for the data prediction D,
built from the current and previous steps' D (one network evaluation per step: N steps, N NFE).
Each starts at lower order (no history yet), and the last step, to sigma = 0 (h infinite), is the
first-order step y_next = D, as k-diffusion does.

The SDE forms (eta > 0) integrate the reverse diffusion SDE the same way: over a step the weight of D
becomes (1 + eta) e^-((1 + eta)(h - v)), with k = (1 + eta) h,
    y_next = e^-k y + integral_0^h (1 + eta) e^-((1 + eta)(h - v)) D(lambda + v) dv + sigma_next sqrt(1 - e^(-2 eta h)) z,
whose noise term gives y_next exactly the marginal noise level sigma_next when D is exact. All
members run one loop, :func:`multistep`, and differ in the history term (:func:`midpoint_correction`
for 2M, :func:`polynomial_correction` for 3M) and in eta.
"""
from __future__ import annotations

import math
from collections.abc import Callable
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


# the history term of a step: (D_i, [(D, h) of the previous steps, newest first], h, eta) -> term
Correction = Callable[[Tensor, list[tuple[Tensor, float]], float, float], Tensor | float]


def midpoint_correction(d0: Tensor, hist: list[tuple[Tensor, float]], h: float, eta: float) -> Tensor | float:
    """2M's second-order term in Lu et al.'s Algorithm 2 form (the "midpoint" form, also diffusers' and
    k-diffusion's): (1 - e^-k) (h / (2 h_prev)) (D_i - D_(i-1)), with k = (1 + eta) h."""
    if not hist:
        return 0.0
    d1, h1 = hist[0]
    return -math.expm1(-(1 + eta) * h) * (h / (2 * h1)) * (d0 - d1)


def polynomial_correction(d0: Tensor, hist: list[tuple[Tensor, float]], h: float, eta: float) -> Tensor | float:
    """3M's history terms: D is replaced by the polynomial in lambda through D_i, D_(i-1), D_(i-2) (Newton
    form: slopes f01 = (D_i - D_(i-1)) / h_1, f12 = (D_(i-1) - D_(i-2)) / h_2, curvature
    f012 = (f01 - f12) / (h_1 + h_2)), integrated exactly against the step's weight:
        phi_1(k) / (1 + eta) (f01 + h_1 f012) + 2 phi_2(k) / (1 + eta)^2 f012,
    with h_1, h_2 the two previous step sizes and phi_k(h) = integral_0^h e^-(h - v) v^k / k! dv
    (:func:`phi`). With one previous step it is the line through two points, phi_1(k) / (1 + eta) f01."""
    if not hist:
        return 0.0
    k, r = (1 + eta) * h, 1 / (1 + eta)
    d1, h1 = hist[0]
    f01 = (d0 - d1) / h1
    if len(hist) == 1:
        return phi(1, k) * r * f01
    d2, h2 = hist[1]
    f012 = (f01 - (d1 - d2) / h2) / (h1 + h2)
    return phi(1, k) * r * (f01 + h1 * f012) + 2 * phi(2, k) * r * r * f012


def multistep(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, correction: Correction, eta: float, s_noise: float,
    generator: Generators, callback: Callback, **cond: Any,
) -> Tensor:
    """The DPM-Solver++ multistep loop: per step one network evaluation D_i, the exact first-order step
    y_next = e^-k y + (1 - e^-k) D_i plus ``correction`` (the history term), plus the SDE noise when
    eta > 0; the last step (to sigma = 0) is y_next = D_i. Keeps the last two (D, h) pairs."""
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")
    if not s_noise > 0:
        raise ConfigError(f"s_noise must be > 0, got {s_noise}")
    model = VEModel(denoiser, cond)
    sigmas, ts = grid.sigma.tolist(), grid.t.tolist()
    y = to_y(x, sigmas[0])
    hist: list[tuple[Tensor, float]] = []  # (D, step size) of the previous two steps, newest first
    for i in range(len(grid)):
        sigma, t, sigma_next = sigmas[i], ts[i], sigmas[i + 1]
        d0 = model(y, sigma, t)
        if sigma_next == 0:
            h, y_next = math.inf, d0
        else:
            h = math.log(sigma / sigma_next)
            k = (1 + eta) * h
            y_next = math.exp(-k) * y - math.expm1(-k) * d0 + correction(d0, hist, h, eta)
            if eta > 0:
                y_next = y_next + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * randn_like(y, generator)
        report(callback, i, t, sigma, y, d0, y_next, sigma_next)
        y = y_next
        hist = [(d0, h)] + hist[:1]
    return y


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: with r = h_prev / h,
    y_next = e^-h y + (1 - e^-h) ((1 + 1/(2r)) D_i - 1/(2r) D_(i-1)).
    Second order; the first step (no D_(i-1)) and the last (to sigma = 0) are first order.
    ``generator`` is unused (deterministic); it is accepted so that every sampler has one signature."""
    return multistep(denoiser, x, grid, correction=midpoint_correction, eta=0.0, s_noise=1.0, generator=generator,
                     callback=callback, **cond)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, eta: float = 1.0, s_noise: float = 1.0,
    generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """SDE-DPM-Solver++(2M): the 2M update applied to the reverse diffusion SDE instead of the ODE (Lu et
    al. 2022 and their reference code; the midpoint form, as in diffusers and k-diffusion). With
    k = (1 + eta) h:

        y_next = e^-k y + (1 - e^-k) (D_i + (h / (2 h_prev)) (D_i - D_(i-1))) + sigma_next sqrt(1 - e^(-2 eta h)) s_noise z.

    eta = 1 is the reverse SDE (its first-order step is DDPM's posterior sample on the same grid),
    eta = 0 is :func:`sample_dpmpp_2m`. The last step (to sigma = 0) returns D and adds no noise.
    Noise comes from ``generator`` (per-image streams keep images independent of the batch)."""
    return multistep(denoiser, x, grid, correction=midpoint_correction, eta=eta, s_noise=s_noise,
                     generator=generator, callback=callback, **cond)


@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """DPM-Solver++(3M): the third-order multistep member of Lu et al.'s family (the paper's Algorithm 2
    is 2M; this is the same construction one order up, :func:`polynomial_correction`):

        y_next = e^-h y + phi_0(h) D_i + phi_1(h) (f01 + h_1 f012) + 2 phi_2(h) f012.

    The first step is first order, the second uses the line through two points, the last (to
    sigma = 0) is y_next = D."""
    return multistep(denoiser, x, grid, correction=polynomial_correction, eta=0.0, s_noise=1.0, generator=generator,
                     callback=callback, **cond)


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser, x: Tensor, grid: Grid, *, eta: float = 1.0, s_noise: float = 1.0,
    generator: Generators = None, callback: Callback = None, **cond: Any,
) -> Tensor:
    """SDE-DPM-Solver++(3M): 3M's polynomial in lambda integrated against the reverse SDE's weight
    (module docstring; the same update as k-diffusion's ``sample_dpmpp_3m_sde``). With k = (1 + eta) h,

        y_next = e^-k y + phi_0(k) D_i + phi_1(k) / (1 + eta) (f01 + h_1 f012) + 2 phi_2(k) / (1 + eta)^2 f012
                 + sigma_next sqrt(1 - e^(-2 eta h)) s_noise z.

    eta = 0 is :func:`sample_dpmpp_3m`; the last step returns D and adds no noise."""
    return multistep(denoiser, x, grid, correction=polynomial_correction, eta=eta, s_noise=s_noise,
                     generator=generator, callback=callback, **cond)
