"""What the network predicts, and everything that follows from it: one class per parametrisation.

A :class:`Parametrization` is the single place that knows how a network's raw output relates to the
data. For a noise level (a training timestep ``t``, possibly fractional) it owns:

- the network's input: :meth:`~Parametrization.network_input` (the scaled state and the time input);
- the conversion of the output to ``(x0_hat, eps_hat)``: :meth:`~Parametrization.to_x0_eps`;
- the training target for the output: :meth:`~Parametrization.target`;
- the gain ``|d x0_hat / d output|`` (:meth:`~Parametrization.x0_gain`), which turns a loss weight
  stated for x_0 (min-SNR) into the weight for this output, and the output-space loss of the
  member into a loss on x0_hat;
- how training draws noise levels: :meth:`~Parametrization.sample_t`.

:class:`difflab.denoiser.Denoiser` wraps a network with one of these and gives samplers
``denoise(x, t)`` and the trainer ``loss(x0, t, noise)``; neither knows which member it holds.

| member (``loss.prediction``) | the network predicts                 | network input             | gain |d x0 / d out| |
| ---------------------------- | ------------------------------------ | ------------------------- | ------------------ |
| ``eps``                      | the noise eps (Ho et al. 2020)       | x_t, t                    | sigma              |
| ``x0``                       | the clean image x_0                  | x_t, t                    | 1                  |
| ``v`` (Salimans & Ho 2022)   | sqrt(abar) eps - sqrt(1 - abar) x_0  | x_t, t                    | sqrt(1 - abar)     |
| ``x_prev`` (Ho et al. 2020)  | the posterior mean of x_(t-1)        | x_t, t                    | 1 / coef_x0(t)     |
| ``edm`` (Karras et al. 2022) | F, with x0_hat = c_skip y + c_out F  | c_in y, c_noise(sigma)    | c_out              |

Adding a member = one subclass here and one row in :data:`PARAMETRIZATIONS` (and its
:class:`Prediction` value). :class:`LossConfig`, the training objective (prediction, loss, weighting),
lives here too, because the objective is a property of the parametrisation.

VP notation: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, sigma = sqrt((1 - abar) / abar).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from difflab.errors import ConfigError, parse_choice
from difflab.losses import LossType, Weighting
from difflab.schedule import F64, NoiseSchedule, broadcast_to


class Prediction(str, Enum):
    """What the network predicts (the :data:`PARAMETRIZATIONS` row it selects)."""

    EPS = "eps"
    X0 = "x0"
    V = "v"
    X_PREV = "x_prev"
    EDM = "edm"


# -- the algebra between the parametrisations, for any abar broadcastable to x (exact, round-trips) --
def x0_from_eps(x_t: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, abar: Tensor) -> Tensor:
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, abar: Tensor) -> Tensor:
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, abar: Tensor) -> Tensor:
    return (1 - abar).sqrt() * x_t + abar.sqrt() * v


@dataclass(frozen=True)
class LossConfig:
    """The training objective: what the network predicts, the loss on its output, and the weighting.

    ``weighting`` none is the plain loss on the network's output; ``min-snr`` weights the loss on x_0
    by min(SNR, gamma) (Hang et al. 2023), expressed for the output through its x0 gain.
    ``sigma_data``, ``p_mean`` and ``p_std`` are the ``edm`` member's constants (Karras et al. 2022,
    table 1: the data's standard deviation, and the log-normal noise-level distribution of training).
    """

    prediction: Prediction = Prediction.EPS
    loss: LossType = LossType.L2
    weighting: Weighting = Weighting.NONE
    min_snr_gamma: float = 5.0
    huber_delta: float = 1.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", parse_choice(Prediction, self.prediction, "prediction type"))
        object.__setattr__(self, "loss", parse_choice(LossType, self.loss, "loss"))
        object.__setattr__(self, "weighting", parse_choice(Weighting, self.weighting, "loss weighting"))
        if self.min_snr_gamma <= 0 or self.huber_delta <= 0:
            raise ConfigError("min_snr_gamma and huber_delta must be positive")
        if not (self.sigma_data > 0 and self.p_std > 0):
            raise ConfigError(f"loss.sigma_data and loss.p_std must be positive, got {self.sigma_data} and {self.p_std}")


@dataclass(frozen=True)
class NoiseLevel:
    """Per-example noise level: training time ``t`` and ``abar`` there, float64 of shape (B,), on the CPU."""

    t: Tensor
    abar: Tensor

    @property
    def sigma(self) -> Tensor:
        return ((1 - self.abar) / self.abar).sqrt()

    @property
    def snr(self) -> Tensor:
        return self.abar / (1 - self.abar)

    @staticmethod
    def at(v: Tensor, like: Tensor) -> Tensor:
        """A per-example float64 quantity, shaped and cast to broadcast against ``like``."""
        return broadcast_to(v, like)


class Parametrization:
    """Base class: the network's input is (x_t, t). Subclasses define the output's meaning."""

    prediction: ClassVar[Prediction]

    def __init__(self, schedule: NoiseSchedule, objective: LossConfig) -> None:
        self.schedule = schedule.base  # the training schedule: the one the network's times refer to
        self.objective = objective

    def level(self, t: Tensor) -> NoiseLevel:
        """The noise level at training times ``t`` (float64 (B,), possibly fractional)."""
        t = torch.as_tensor(t, dtype=F64).cpu()
        return NoiseLevel(t=t, abar=self.schedule.alpha_bar_at(t))

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Training times for ``n`` examples: uniform over the integer timesteps (Ho et al. 2020)."""
        return torch.randint(0, self.schedule.num_timesteps, (n,), generator=generator).to(F64)

    def network_input(self, x_t: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        """What the network is called with: the state and the time input, shape (B,)."""
        return x_t, lv.t

    def to_x0_eps(self, x_t: Tensor, out: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, lv: NoiseLevel) -> Tensor:
        raise NotImplementedError

    def x0_gain(self, lv: NoiseLevel) -> Tensor:
        """|d x0_hat / d output| per example (float64, (B,)): an error e in the output is an error
        gain * e in x0_hat."""
        raise NotImplementedError


class EpsPrediction(Parametrization):
    prediction = Prediction.EPS

    def to_x0_eps(self, x_t: Tensor, out: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        return x0_from_eps(x_t, out, lv.at(lv.abar, x_t)), out

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, lv: NoiseLevel) -> Tensor:
        return noise

    def x0_gain(self, lv: NoiseLevel) -> Tensor:
        return lv.sigma


class X0Prediction(Parametrization):
    prediction = Prediction.X0

    def to_x0_eps(self, x_t: Tensor, out: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        return out, eps_from_x0(x_t, out, lv.at(lv.abar, x_t))

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, lv: NoiseLevel) -> Tensor:
        return x0

    def x0_gain(self, lv: NoiseLevel) -> Tensor:
        return torch.ones_like(lv.abar)


class VPrediction(Parametrization):
    prediction = Prediction.V

    def to_x0_eps(self, x_t: Tensor, out: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        abar = lv.at(lv.abar, x_t)
        return x0_from_v(x_t, out, abar), eps_from_v(x_t, out, abar)

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, lv: NoiseLevel) -> Tensor:
        return v_from_x0_eps(x0, noise, lv.at(lv.abar, x0))

    def x0_gain(self, lv: NoiseLevel) -> Tensor:
        return (1 - lv.abar).sqrt()


def _lerp(table: Tensor, t: Tensor) -> Tensor:
    """A per-timestep float64 table at possibly fractional ``t``: linear between integer steps."""
    t = t.clamp(0, len(table) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    w = t - lo
    return (1 - w) * table[lo] + w * table[hi]


class XPrevPrediction(Parametrization):
    """The network predicts the posterior mean of x_(t-1): mu~ = coef_x0(t) x_0 + coef_xt(t) x_t (Ho et
    al. 2020, eq. 7 and their "predict mu~" ablation; improved-diffusion's ``ModelMeanType.PREVIOUS_X``),
    with the coefficients of :func:`difflab.schedule.posterior` for the step t -> t - 1 of the training
    schedule (at t = 0: mu~ = x_0). A full-grid DDPM step is then the network's output plus noise.
    At fractional t (ODE grids) the coefficients are interpolated linearly between training steps.
    x0_hat = (out - coef_xt x_t) / coef_x0 multiplies the output's error by 1 / coef_x0 (~8000 at the
    noisy end of DDPM's linear schedule), which is why Ho et al. found this the weakest choice."""

    prediction = Prediction.X_PREV

    def _coefs(self, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        s = self.schedule
        return _lerp(torch.as_tensor(s.posterior_mean_coef1), lv.t), _lerp(torch.as_tensor(s.posterior_mean_coef2), lv.t)

    def to_x0_eps(self, x_t: Tensor, out: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        c1, c2 = self._coefs(lv)
        x0 = (out - lv.at(c2, x_t) * x_t) / lv.at(c1, x_t)
        return x0, eps_from_x0(x_t, x0, lv.at(lv.abar, x_t))

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, lv: NoiseLevel) -> Tensor:
        c1, c2 = self._coefs(lv)
        return lv.at(c1, x0) * x0 + lv.at(c2, x0) * x_t

    def x0_gain(self, lv: NoiseLevel) -> Tensor:
        return 1 / self._coefs(lv)[0]


class EDMPreconditioning(Parametrization):
    """Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", sec. 5
    and table 1): on the VE state y = x_t / sqrt(abar) = x_0 + sigma eps the denoiser is
        D(y; sigma) = c_skip y + c_out F(c_in y; c_noise),
        c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    with sd = ``sigma_data``, so F's input and its target have unit variance at every noise level.
    Training draws ln(sigma) ~ N(p_mean, p_std^2), mapped to the training schedule's time (clamped to
    its [sigma_min, sigma_max]), and weights ||D - x_0||^2 by lambda = 1 / c_out^2: that is the plain
    loss on F against (x_0 - c_skip y) / c_out, so ``weighting`` none gives EDM's loss exactly.

    The time input is EDM's c_noise = ln(sigma) / 4 scaled by 1000 (250 ln sigma): difflab's UNet
    embeds time with DDPM's sinusoids (frequencies 1 .. 1e-4), made for t in [0, 1000), and
    ln(sigma) / 4 alone spans only ~2.4 (sigma from 0.01 to 157) where its fastest frequency turns
    less than half a period."""

    prediction = Prediction.EDM

    def _scalings(self, lv: NoiseLevel) -> tuple[Tensor, Tensor, Tensor]:
        sigma, sd = lv.sigma, self.objective.sigma_data
        total = sigma**2 + sd**2
        return sd**2 / total, sigma * sd / total.sqrt(), 1 / total.sqrt()  # c_skip, c_out, c_in

    @staticmethod
    def _y(x_t: Tensor, lv: NoiseLevel) -> Tensor:
        return x_t / lv.at(lv.abar.sqrt(), x_t)

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        log_sigma = self.objective.p_mean + self.objective.p_std * torch.randn(n, generator=generator, dtype=F64)
        return self.schedule.t_at_sigma(log_sigma.exp())

    def network_input(self, x_t: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        c_in = self._scalings(lv)[2]
        return lv.at(c_in, x_t) * self._y(x_t, lv), 250 * lv.sigma.log()

    def to_x0_eps(self, x_t: Tensor, out: Tensor, lv: NoiseLevel) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _ = self._scalings(lv)
        x0 = lv.at(c_skip, x_t) * self._y(x_t, lv) + lv.at(c_out, x_t) * out
        return x0, eps_from_x0(x_t, x0, lv.at(lv.abar, x_t))

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, lv: NoiseLevel) -> Tensor:
        c_skip, c_out, _ = self._scalings(lv)
        return (x0 - lv.at(c_skip, x0) * self._y(x_t, lv)) / lv.at(c_out, x0)

    def x0_gain(self, lv: NoiseLevel) -> Tensor:
        return self._scalings(lv)[1]


PARAMETRIZATIONS: dict[Prediction, type[Parametrization]] = {
    Prediction.EPS: EpsPrediction,
    Prediction.X0: X0Prediction,
    Prediction.V: VPrediction,
    Prediction.X_PREV: XPrevPrediction,
    Prediction.EDM: EDMPreconditioning,
}


def make_parametrization(schedule: NoiseSchedule, objective: LossConfig) -> Parametrization:
    return PARAMETRIZATIONS[objective.prediction](schedule, objective)
