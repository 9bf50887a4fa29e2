"""One contract for every network: (x_t, t, **cond) -> x0_hat (and eps_hat).

A network may predict eps, x_0 or v; samplers never need to know which. ``Denoiser`` turns any of
them into :class:`DenoiserOutput` (x0_hat, eps_hat) using the schedule's abar at t, where t may
be fractional (ODE-solver grids place steps between training timesteps; abar is interpolated in
log-sigma, see :meth:`NoiseSchedule.sigma_at`). Conditioning keyword arguments (class labels
today, anything tomorrow) are passed through to the network unchanged.

Optional x0 clipping: ``clip`` clamps x0_hat to [-1, 1]; ``dynamic`` is the dynamic thresholding
of Saharia et al. 2022 (Imagen, section 2.3): per image, s = the p-th percentile of |x0_hat|,
s = max(s, 1), x0_hat = clamp(x0_hat, -s, s) / s. When x0_hat is changed, eps_hat is recomputed
from it so that the pair stays consistent with x_t (improved-diffusion does the same for DDIM).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.errors import ConfigError, parse_choice
from difflab.schedule import NoiseSchedule, Prediction, broadcast_to, eps_from_v, eps_from_x0, x0_from_eps, x0_from_v


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
    """Wrap ``model(x, t, **cond)`` predicting ``prediction`` into the x0/eps contract."""

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: Prediction | str = Prediction.EPS,
        clip: Clip | str = Clip.NONE,
        dynamic_percentile: float = 0.995,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.model = model
        self.schedule = schedule
        # the network call alone runs under autocast (bf16 where it pays); its output and all the
        # sampler arithmetic stay fp32 and above
        self.autocast = autocast
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.prediction = parse_choice(Prediction, prediction, "prediction type")
        self.clip = parse_choice(Clip, clip, "x0 clipping mode")
        if not 0.5 <= dynamic_percentile <= 1.0:
            raise ConfigError(f"dynamic_percentile must be in [0.5, 1], got {dynamic_percentile}")
        self.dynamic_percentile = dynamic_percentile

    def predict(self, x: Tensor, t: Tensor | float, **cond: Any) -> DenoiserOutput:
        t_b = torch.as_tensor(t, dtype=torch.float64)
        if t_b.ndim == 0:
            t_b = t_b.expand(x.shape[0])
        abar = broadcast_to(self.schedule.alpha_bar_at(t_b), x).float()
        x = x.float()
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.model(x.contiguous(memory_format=self.memory_format), t_b.float().to(x.device), **cond)
        out = out.float().contiguous()
        if self.prediction is Prediction.EPS:
            eps, x0 = out, x0_from_eps(x, out, abar)
        elif self.prediction is Prediction.X0:
            x0, eps = out, eps_from_x0(x, out, abar)
        else:
            x0, eps = x0_from_v(x, out, abar), eps_from_v(x, out, abar)
        if self.clip is not Clip.NONE:
            x0 = x0.clamp(-1, 1) if self.clip is Clip.CLIP else dynamic_threshold(x0, self.dynamic_percentile)
            eps = eps_from_x0(x, x0, abar)
        return DenoiserOutput(x0=x0, eps=eps)

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """denoise(x, t, **cond) -> x0_hat."""
        return self.predict(x, t, **cond).x0
