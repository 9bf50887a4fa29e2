"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers.base import Callback, Step
from difflab.samplers.grid import Grid
from difflab.samplers.noise import Generators, randn_like


def ddim_step(x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_s: float, eta: float, generator: Generators) -> Tensor:
    """One DDIM step from x at abar_t to abar_s, given the denoiser's (x0_hat, eps_hat) there (eq. 12)."""
    s = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    x_next = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - s * s, 0.0)) * eps
    if s > 0:
        x_next = x_next + s * randn_like(x, generator)
    return x_next


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback = None,
    **cond: Any,
) -> Tensor:
    """x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - s^2) eps_hat + s z for each step t -> s, with
    s = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s) (eq. 16).

    eta = 0 is the deterministic DDIM (the probability-flow ODE's first-order solver in the
    variable x / sqrt(abar)); eta = 1 is DDPM's fixed-small ancestral sampler on the same grid.
    """
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"--eta must be in [0, 1], got {eta}")
    abar = grid.alpha_bar.tolist()
    for i in range(len(grid)):
        t = float(grid.t[i])
        a_t, a_s = abar[i], abar[i + 1]
        out = denoiser.predict(x, t, **cond)
        x_next = ddim_step(x, out.x0, out.eps, a_t, a_s, eta, generator)
        if callback is not None:
            callback(Step(i, t, float(grid.sigma[i]), x, out.x0, x_next))
        x = x_next
    return x
