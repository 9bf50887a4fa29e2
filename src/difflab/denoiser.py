"""One object around every network: samplers call ``denoise(x, t, **cond)``, the trainer calls
``loss(x0, t, noise, **cond)``.

:class:`Denoiser` holds a network, the schedule it runs on and a
:class:`~difflab.parametrization.Parametrization` (eps, x0, v, ...: what the network predicts). It
owns nothing about the parametrisation itself; it composes: scale the input, run the network (in
bf16 autocast and channels_last where asked), convert the output to ``x0_hat`` (and ``eps_hat``)
for samplers, or compare it with the training target for the trainer.

``t`` is a timestep of ``schedule``, possibly fractional (ODE-solver grids place steps between
training timesteps; the noise level is interpolated in log-sigma, see
:meth:`NoiseSchedule.sigma_at`). A respaced schedule's steps are mapped back to the network's
training timesteps (:meth:`NoiseSchedule.training_time`), never passed through unmapped.
Conditioning keyword arguments (class labels today, anything tomorrow) reach the network unchanged.

Classifier-free guidance (Ho & Salimans 2022): with ``guidance`` w != 1 and a condition given, each
call runs the network once on the batch doubled (the condition, then the null condition,
:func:`difflab.conditioning.null_condition`) and returns x0_u + w (x0_c - x0_u) (and the same for
eps): w = 1 is the conditional model, w = 0 the unconditional one (run as one pass on the null
condition). Combining x0 is the same as
combining eps (the conversion between them is affine at a fixed x_t and t), so every
parametrisation and every sampler gets the same rule. ``guidance_interval = (lo, hi)`` applies it
only where lo <= sigma <= hi (Kynkaanniemi et al. 2024), the plain conditional model elsewhere.

Optional x0 clipping: ``clip`` clamps x0_hat to [-1, 1]; ``dynamic`` is the dynamic thresholding
of Saharia et al. 2022 (Imagen, section 2.3): per image, s = the p-th percentile of |x0_hat|,
s = max(s, 1), x0_hat = clamp(x0_hat, -s, s) / s. When x0_hat is changed, eps_hat is recomputed
from it so that the pair stays consistent with x_t (improved-diffusion does the same for DDIM).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from difflab.conditioning import concat, is_null, null_condition
from difflab.devices import to_device
from difflab.errors import ConfigError, parse_choice
from difflab.losses import Weighting, per_example_loss
from difflab.parametrization import LossConfig, NoiseLevel, Prediction, eps_from_x0, make_parametrization
from difflab.precision import autocast_context
from difflab.schedule import F64, NoiseSchedule, broadcast_to


class Clip(str, Enum):
    NONE = "none"
    CLIP = "clip"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class DenoiserOutput:
    x0: Tensor
    eps: Tensor


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """Imagen's dynamic thresholding, per image."""
    s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0)
    s = broadcast_to(s, x0)
    return x0.clamp(-s, s) / s


class Denoiser:
    """``model(x, t, **cond)`` under the parametrisation of ``objective`` (a :class:`LossConfig`, or
    just a :class:`Prediction` for sampling with the default objective)."""

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: NoiseSchedule,
        objective: LossConfig | Prediction | str = Prediction.EPS,
        clip: Clip | str = Clip.NONE,
        dynamic_percentile: float = 0.995,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        guidance: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> None:
        self.model = model
        self.schedule = schedule
        if not isinstance(objective, LossConfig):
            objective = LossConfig(prediction=parse_choice(Prediction, objective, "prediction type"))
        self.objective = objective
        self.param = make_parametrization(schedule, self.objective)
        # the network call alone runs under autocast (bf16 where it pays); its output and all the
        # sampler and loss arithmetic stay fp32 and above
        self.autocast = autocast
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.clip = parse_choice(Clip, clip, "x0 clipping mode")
        if not 0.5 <= dynamic_percentile <= 1.0:
            raise ConfigError(f"dynamic_percentile must be in [0.5, 1], got {dynamic_percentile}")
        self.dynamic_percentile = dynamic_percentile
        if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise ConfigError(f"--guidance must be a number >= 0, got {guidance!r}")
        if guidance_interval is not None and not 0 <= guidance_interval[0] < guidance_interval[1]:
            raise ConfigError(f"--guidance-interval needs 0 <= low < high, got {guidance_interval}")
        self.guidance = float(guidance)
        self.guidance_interval = guidance_interval

    def guided(self, guidance: float, interval: tuple[float, float] | None = None) -> Denoiser:
        """The same network and settings with another guidance weight (and interval)."""
        return Denoiser(self.model, self.schedule, self.objective, clip=self.clip, dynamic_percentile=self.dynamic_percentile,
                        autocast=self.autocast, channels_last=self.memory_format == torch.channels_last,
                        guidance=guidance, guidance_interval=interval)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (the CPU for a network without parameters)."""
        params = getattr(self.model, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        return first.device if first is not None else torch.device("cpu")

    @property
    def prediction(self) -> Prediction:
        return self.objective.prediction

    def _level(self, t: Tensor | float, batch: int) -> NoiseLevel:
        t_b = torch.as_tensor(t, dtype=F64).cpu()
        if t_b.ndim == 0:
            t_b = t_b.expand(batch)
        return self.param.level(self.schedule.training_time(t_b))

    def _network(self, x_t: Tensor, lv: NoiseLevel, **cond: Any) -> Tensor:
        x_in, t_in = self.param.network_input(x_t, lv)
        with autocast_context(x_t.device, self.autocast):
            t_net = to_device(t_in, x_t.device, torch.float32)
            out = self.model(x_in.contiguous(memory_format=self.memory_format), t_net, **cond)
        return out.float()

    # -- sampling -------------------------------------------------------------------------
    def _weights(self, lv: NoiseLevel) -> Tensor | None:
        """Per-example guidance weights, or None where guidance changes nothing."""
        if self.guidance == 1.0:
            return None
        w = torch.full_like(lv.t, self.guidance)
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            w = torch.where((lv.sigma >= lo) & (lv.sigma <= hi), w, torch.ones_like(w))
        return None if bool((w == 1.0).all()) else w

    def predict(self, x: Tensor, t: Tensor | float, **cond: Any) -> DenoiserOutput:
        """(x0_hat, eps_hat) at the VP state ``x`` and schedule timestep ``t`` (scalar or (B,))."""
        lv = self._level(t, x.shape[0])
        x = x.float()
        w = self._weights(lv) if cond and not is_null(cond) else None
        if w is not None and bool((w == 0).all()):  # w = 0 is the unconditional model: one pass, no doubling
            cond, w = null_condition(cond), None
        if w is None:
            x0, eps = self.param.to_x0_eps(x, self._network(x, lv, **cond).contiguous(), lv)
        else:  # one network call on the doubled batch: conditional, then unconditional
            both = NoiseLevel(t=torch.cat([lv.t, lv.t]), abar=torch.cat([lv.abar, lv.abar]))
            out = self._network(torch.cat([x, x]), both, **concat(cond, null_condition(cond))).contiguous()
            x0_c, eps_c = self.param.to_x0_eps(x, out[: len(x)], lv)
            x0_u, eps_u = self.param.to_x0_eps(x, out[len(x):], lv)
            wx = lv.at(w, x)
            x0, eps = x0_u + wx * (x0_c - x0_u), eps_u + wx * (eps_c - eps_u)
        if self.clip is not Clip.NONE:
            x0 = x0.clamp(-1, 1) if self.clip is Clip.CLIP else dynamic_threshold(x0, self.dynamic_percentile)
            eps = eps_from_x0(x, x0, lv.at(lv.abar, x))
        return DenoiserOutput(x0=x0, eps=eps)

    def denoise(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """x0_hat: what every sampler asks for."""
        return self.predict(x, t, **cond).x0

    __call__ = denoise

    # -- training -------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Training timesteps for ``n`` examples, drawn as the parametrisation prescribes (float64, CPU)."""
        return self.param.sample_t(n, generator)

    def loss(self, x0: Tensor, t: Tensor, noise: Tensor, **cond: Any) -> Tensor:
        """Per-example weighted loss (B,) at schedule timesteps ``t`` with the given ``noise``: the
        network's output against the parametrisation's target, weighted as ``objective`` says."""
        lv = self._level(t, x0.shape[0])
        x_t = lv.at(lv.abar.sqrt(), x0) * x0 + lv.at((1 - lv.abar).sqrt(), x0) * noise
        out = self._network(x_t, lv, **cond)
        target = self.param.target(x0, noise, x_t, lv)
        obj = self.objective
        loss = per_example_loss(out, target.float(), obj.loss, obj.huber_delta)
        if obj.weighting is Weighting.MIN_SNR:
            weight = lv.snr.clamp(max=obj.min_snr_gamma) * self.param.x0_gain(lv) ** 2
            loss = loss * weight.to(device=loss.device, dtype=loss.dtype)
        return loss
