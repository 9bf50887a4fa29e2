"""The variable the ODE and SDE samplers integrate in, and what they share.

The network sees the VP state x = sqrt(abar) x0 + sqrt(1 - abar) eps. Dividing by sqrt(abar) gives
the variance-exploding view y = x / sqrt(abar) = x0 + sigma eps, sigma = sqrt((1 - abar) / abar)
(Karras et al. 2022, arXiv:2206.00364, sec. 2 and eq. 4 with s(t) = 1/sqrt(1 + sigma^2)), where the
probability-flow ODE of any VP schedule is

    dy/dsigma = (y - D(y; sigma)) / sigma,        D = the denoiser's x0_hat,

and in lambda = -log sigma (half the log-SNR) dy/dlambda = D - y, whose exact solution over a step
of size h is y_next = e^-h y + integral of e^-(lambda_next - u) D(u) du (the data-prediction
form of Lu et al. 2022, arXiv:2211.01095). The samplers here carry y and hand the network
x = y / sqrt(1 + sigma^2) at the matching model time t; the callback still sees VP states.
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers.base import Callback, Step
from difflab.samplers.noise import Generators, randn_like


def vp_scale(sigma: float) -> float:
    """sqrt(abar) at noise level sigma: x = vp_scale(sigma) * y."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


class VEModel:
    """D(y; sigma): the denoiser in the VE variable, evaluated at noise level sigma.

    The model time is ``t`` when given (a grid point), else ``schedule.t_at_sigma(sigma)`` (a point
    between grid points: Heun's second stage, churned noise levels).
    """

    def __init__(self, denoiser: Denoiser, cond: dict[str, Any]) -> None:
        self.denoiser, self.cond = denoiser, cond

    def t_at(self, sigma: float) -> float:
        return float(self.denoiser.schedule.t_at_sigma(sigma))

    def __call__(self, y: Tensor, sigma: float, t: float | None = None) -> Tensor:
        t = self.t_at(sigma) if t is None else t
        return self.denoiser.predict(y * vp_scale(sigma), t, **self.cond).x0.to(y.dtype)


def to_y(x: Tensor, sigma: float) -> Tensor:
    return x / vp_scale(sigma)


def to_x(y: Tensor, sigma: float) -> Tensor:
    return y * vp_scale(sigma)


def report(callback: Callback, i: int, t: float, sigma: float, y: Tensor, x0: Tensor, y_next: Tensor,
           sigma_next: float) -> None:
    """Hand step ``i`` to the callback in VP states (the sampler itself works in y)."""
    if callback is not None:
        callback(Step(i, t, sigma, to_x(y, sigma), x0, to_x(y_next, sigma_next)))


def lift_noise(y: Tensor, sigma: float, gamma: float, sigma_cap: float, s_noise: float,
          generator: Generators) -> tuple[Tensor, float]:
    """Karras et al. 2022, Algorithm 2, lines 5-6: raise the noise level from sigma to
    sigma_hat = sigma (1 + gamma) by adding fresh noise of variance sigma_hat^2 - sigma^2.

    sigma_hat is capped at ``sigma_cap`` (the schedule's sigma_max): a discrete-time model was never
    trained above it, and t_at_sigma would silently clamp the model time there."""
    sigma_hat = min(sigma * (1.0 + gamma), sigma_cap)
    if sigma_hat <= sigma:
        return y, sigma
    return y + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(y, generator), sigma_hat


def churn_gamma(churn: float, steps: int, sigma: float, s_tmin: float, s_tmax: float) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0 (Algorithm 2, line 4)."""
    if churn <= 0 or not s_tmin <= sigma <= s_tmax:
        return 0.0
    return min(churn / steps, math.sqrt(2.0) - 1.0)


def check_churn(churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    if not churn >= 0:
        raise ConfigError(f"--churn must be >= 0, got {churn}")
    if not 0 <= s_tmin <= s_tmax:
        raise ConfigError(f"need 0 <= s_tmin <= s_tmax, got {s_tmin} and {s_tmax}")
    if not s_noise > 0:
        raise ConfigError(f"s_noise must be > 0, got {s_noise}")
