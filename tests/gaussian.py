"""Gaussian data, for which the ideal denoiser and the probability-flow ODE are known exactly.

For x_0 ~ N(mu, s^2 I) and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps:
    E[x_0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) * (x_t - sqrt(abar) mu).
In y = x / sqrt(abar) = x_0 + sigma eps, the probability-flow ODE dy/dsigma = (y - D(y)) / sigma
scales y - mu by sqrt(s^2 + sigma^2), so its exact solution from y_T is
    x_0 = mu + (y_T - mu) * s / sqrt(s^2 + sigma_T^2).
"""
from __future__ import annotations

import torch

from difflab.parametrization import Prediction, eps_from_x0, v_from_x0_eps
from difflab.schedule import NoiseSchedule, broadcast_to


class GaussianModel(torch.nn.Module):
    """A 'network' that returns the ideal prediction (eps, x0 or v) for Gaussian data."""

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float, prediction: Prediction = Prediction.EPS):
        super().__init__()
        self.schedule, self.mu, self.s, self.prediction = schedule, mu, s, Prediction(prediction)

    def forward(self, x, t):
        abar = broadcast_to(self.schedule.alpha_bar_at(t.double()), x.double())
        xd = x.double()
        x0 = self.mu + abar.sqrt() * self.s**2 / (abar * self.s**2 + 1 - abar) * (xd - abar.sqrt() * self.mu)
        if self.prediction is Prediction.X0:
            out = x0
        elif self.prediction is Prediction.EPS:
            out = eps_from_x0(xd, x0, abar)
        else:
            out = v_from_x0_eps(x0, eps_from_x0(xd, x0, abar), abar)
        return out.to(x.dtype)


def exact_ode_solution(schedule: NoiseSchedule, x_T, mu: float, s: float, t_start: float):
    sigma_T = float(schedule.sigma_at(t_start))
    abar_T = 1 / (1 + sigma_T**2)
    y = x_T.double() / abar_T**0.5
    return mu + (y - mu) * s / (s**2 + sigma_T**2) ** 0.5
