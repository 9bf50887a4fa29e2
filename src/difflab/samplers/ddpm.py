"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on the full or a respaced grid."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import parse_choice
from difflab.samplers.base import Callback, Step
from difflab.samplers.grid import Grid
from difflab.samplers.noise import Generators, randn_like
from difflab.schedule import VarianceType, posterior


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    variance: VarianceType | str = VarianceType.FIXED_SMALL,
    generator: Generators = None,
    callback: Callback = None,
    **cond: Any,
) -> Tensor:
    """x_{s} ~ N(mu~(x_t, x0_hat), var) for each grid step t -> s, ending at data.

    With a grid of respaced timesteps, beta_t = 1 - abar_t / abar_s is the respaced process's beta
    and mu~ its posterior mean (Ho et al. eq. 7), both from :func:`difflab.schedule.posterior`.
    ``variance`` is fixed-small (beta~_t, the posterior variance) or fixed-large (beta_t). The last step
    returns the posterior mean, x0_hat.
    """
    kind = parse_choice(VarianceType, variance, "variance type")
    abar = grid.alpha_bar.tolist()
    for i in range(len(grid)):
        t = float(grid.t[i])
        post = posterior(abar[i], abar[i + 1])
        x0 = denoiser(x, t, **cond)
        mean = post.coef_x0 * x0 + post.coef_xt * x
        if i < len(grid) - 1:
            x_next = mean + math.sqrt(post.reverse_variance(kind)) * randn_like(x, generator)
        else:
            x_next = mean
        if callback is not None:
            callback(Step(i, t, float(grid.sigma[i]), x, x0, x_next))
        x = x_next
    return x
