"""The denoising objective, per example: the training loop reduces it (mean, or a weighted mean).

For x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps the network is trained to predict its target
(eps, x_0 or v) under an l1, l2 or Huber loss, optionally weighted per timestep by
min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from difflab.errors import ConfigError, parse_choice
from difflab.schedule import NoiseSchedule, Prediction, broadcast_to, v_from_x0_eps


class LossType(str, Enum):
    L1 = "l1"
    L2 = "l2"
    HUBER = "huber"


class Weighting(str, Enum):
    NONE = "none"
    MIN_SNR = "min-snr"


@dataclass(frozen=True)
class LossConfig:
    prediction: Prediction = Prediction.EPS
    loss: LossType = LossType.L2
    weighting: Weighting = Weighting.NONE
    min_snr_gamma: float = 5.0
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", parse_choice(Prediction, self.prediction, "prediction type"))
        object.__setattr__(self, "loss", parse_choice(LossType, self.loss, "loss"))
        object.__setattr__(self, "weighting", parse_choice(Weighting, self.weighting, "loss weighting"))
        if self.min_snr_gamma <= 0 or self.huber_delta <= 0:
            raise ConfigError("min_snr_gamma and huber_delta must be positive")

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


def per_example_loss(pred: Tensor, target: Tensor, kind: LossType | str, huber_delta: float = 1.0) -> Tensor:
    """Mean over every non-batch dimension: shape (B,)."""
    kind = parse_choice(LossType, kind, "loss")
    if kind is LossType.L2:
        elem = (pred - target) ** 2
    elif kind is LossType.L1:
        elem = (pred - target).abs()
    else:
        elem = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    return elem.flatten(1).mean(1)


def min_snr_weight(snr: Tensor, prediction: Prediction, gamma: float) -> Tensor:
    """min(SNR, gamma) expressed for the target the network predicts.

    The x_0-loss weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for eps (since
    ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2) and min(SNR, gamma) / (SNR + 1) for v.
    """
    clipped = snr.clamp(max=gamma)
    if prediction is Prediction.X0:
        return clipped
    if prediction is Prediction.EPS:
        return clipped / snr
    return clipped / (snr + 1)


def training_target(prediction: Prediction, x0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    if prediction is Prediction.EPS:
        return eps
    if prediction is Prediction.X0:
        return x0
    return v_from_x0_eps(x0, eps, abar)


def diffusion_loss(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    cfg: LossConfig,
    **cond: Any,
) -> Tensor:
    """Per-example weighted loss (B,) of ``model`` at integer timesteps ``t`` with the given noise."""
    x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t.float(), **cond)
    abar = broadcast_to(schedule.alphas_cumprod[t.cpu()], x0)
    target = training_target(cfg.prediction, x0, noise, abar)
    loss = per_example_loss(pred.float(), target.float(), cfg.loss, cfg.huber_delta)
    if cfg.weighting is Weighting.MIN_SNR:
        snr = schedule.snr[t.cpu()].to(device=loss.device, dtype=loss.dtype)
        loss = loss * min_snr_weight(snr, cfg.prediction, cfg.min_snr_gamma)
    return loss
