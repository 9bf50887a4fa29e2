"""Exponential moving average of the weights, with the half-life measured in images.

Karras et al. 2022 (EDM, ``training/training_loop.py``): after each optimizer step on
``batch_images`` images, ema <- beta * ema + (1 - beta) * weights with
beta = 0.5 ** (batch_images / halflife), where the half-life ramps up as
min(halflife_images, rampup * images_seen) so early, poor weights are forgotten quickly.
Expressed in images, the averaging horizon does not change with batch size or GPU count.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(images_seen: float, batch_images: float, halflife_images: float, rampup: float) -> float:
    halflife = halflife_images
    if rampup > 0:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


class EMA:
    """Holds an fp32 copy of ``model`` whose parameters trail the model's."""

    def __init__(self, model: nn.Module, halflife_images: float, rampup: float) -> None:
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.halflife_images = halflife_images
        self.rampup = rampup

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: float, batch_images: float) -> float:
        beta = ema_beta(images_seen, batch_images, self.halflife_images, self.rampup)
        ema_p: list[torch.Tensor] = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach().float() for p in model.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return beta
