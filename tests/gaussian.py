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


def posterior_mean_coefs(schedule: NoiseSchedule, t):
    """Ho et al. 2020, eq. 7: mu~_t = c1 x_0 + c2 x_t for the step t -> t - 1, written out from the betas
    at the integer steps (abar_{-1} = 1) and linear in between, as the x_prev member defines it."""
    def at(k):
        abar, beta = schedule.alphas_cumprod[k], schedule.betas[k]
        prev = torch.where(k > 0, schedule.alphas_cumprod[(k - 1).clamp(min=0)], torch.ones_like(abar))
        return beta * prev.sqrt() / (1 - abar), (1 - prev) * (1 - beta).sqrt() / (1 - abar)
    t = t.double()
    lo, w = t.floor().long(), t - t.floor()
    (a1, a2), (b1, b2) = at(lo), at((lo + 1).clamp(max=len(schedule) - 1))
    return (1 - w) * a1 + w * b1, (1 - w) * a2 + w * b2


class GaussianModel(torch.nn.Module):
    """A 'network' that returns the ideal prediction (eps, x0, v or x_prev) for Gaussian data."""

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float, prediction: Prediction = Prediction.EPS):
        super().__init__()
        self.schedule, self.mu, self.s, self.prediction = schedule, mu, s, Prediction(prediction)

    def forward(self, x, t):
        if self.prediction is Prediction.EDM:
            return self._edm(x, t)
        abar = broadcast_to(self.schedule.alpha_bar_at(t.double()), x.double())
        xd = x.double()
        x0 = self.mu + abar.sqrt() * self.s**2 / (abar * self.s**2 + 1 - abar) * (xd - abar.sqrt() * self.mu)
        if self.prediction is Prediction.X0:
            out = x0
        elif self.prediction is Prediction.EPS:
            out = eps_from_x0(xd, x0, abar)
        elif self.prediction is Prediction.V:
            out = v_from_x0_eps(x0, eps_from_x0(xd, x0, abar), abar)
        else:  # x_prev
            c1, c2 = (broadcast_to(c, xd) for c in posterior_mean_coefs(self.schedule, t))
            out = c1 * x0 + c2 * xd
        return out.to(x.dtype)

    def _edm(self, x_in, c_noise, sigma_data: float = 0.5):
        """Karras et al. 2022, table 1: the network sees c_in y and c_noise = 250 ln(sigma) (difflab's
        scaling of ln(sigma) / 4) and must output F = (D - c_skip y) / c_out, D = E[x_0 | y]."""
        sigma = broadcast_to((c_noise.double() / 250).exp(), x_in.double())
        total = sigma**2 + sigma_data**2
        y = x_in.double() * total.sqrt()  # c_in = 1 / sqrt(sigma^2 + sd^2)
        d = self.mu + self.s**2 / (self.s**2 + sigma**2) * (y - self.mu)
        c_skip, c_out = sigma_data**2 / total, sigma * sigma_data / total.sqrt()
        return ((d - c_skip * y) / c_out).to(x_in.dtype)


def exact_ode_solution(schedule: NoiseSchedule, x_T, mu: float, s: float, t_start: float):
    sigma_T = float(schedule.sigma_at(t_start))
    abar_T = 1 / (1 + sigma_T**2)
    y = x_T.double() / abar_T**0.5
    return mu + (y - mu) * s / (s**2 + sigma_T**2) ** 0.5


class GaussianClassModel(torch.nn.Module):
    """The ideal eps network for class-conditional Gaussian data: x_0 | c ~ N(mu_c, s^2 I), classes equally
    likely. With a label c it returns the class's exact prediction; with label -1 the unconditional one,
    E[x_0 | x_t] = sum_c p(c | x_t) E[x_0 | x_t, c], p(c | x_t) proportional to N(x_t; sqrt(abar) mu_c, abar s^2 + 1 - abar)."""

    def __init__(self, schedule: NoiseSchedule, mus, s: float):
        super().__init__()
        self.schedule, self.mus, self.s = schedule, torch.as_tensor(mus, dtype=torch.float64), s  # mus (K, D)

    def forward(self, x, t, labels=None):
        xd = x.double()
        abar = broadcast_to(self.schedule.alpha_bar_at(t.double()), xd)
        var = abar * self.s**2 + 1 - abar
        gain = abar.sqrt() * self.s**2 / var
        # per class: posterior means (K, B, D) and log-likelihoods of x_t (K, B)
        means = torch.stack([mu + gain * (xd - abar.sqrt() * mu) for mu in self.mus])
        loglik = torch.stack([-((xd - abar.sqrt() * mu) ** 2 / (2 * var)).sum(1) for mu in self.mus])
        mixture = (torch.softmax(loglik, 0)[..., None] * means).sum(0)
        if labels is None:
            x0 = mixture
        else:
            lab = labels.reshape(-1)
            picked = means[lab.clamp(min=0), torch.arange(len(xd))]
            x0 = torch.where((lab >= 0)[:, None], picked, mixture)
        return eps_from_x0(xd, x0, abar).to(x.dtype)
