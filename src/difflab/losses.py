"""Per-example losses on a network's output; the training objective that chooses among them is
:class:`difflab.parametrization.LossConfig`, and :meth:`difflab.denoiser.Denoiser.loss` applies it.

l1, l2 or Huber, each averaged over every non-batch dimension, so the training loop can weight
examples (min-SNR-gamma, Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy") before reducing.
"""
from __future__ import annotations

from enum import Enum

import torch.nn.functional as F
from torch import Tensor

from difflab.errors import parse_choice


class LossType(str, Enum):
    L1 = "l1"
    L2 = "l2"
    HUBER = "huber"


class Weighting(str, Enum):
    NONE = "none"  # the plain loss on the network's output
    MIN_SNR = "min-snr"  # min(SNR, gamma) on x_0, expressed for the output


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
