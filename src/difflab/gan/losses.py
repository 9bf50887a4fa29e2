"""The GAN objectives: the non-saturating logistic loss (Goodfellow et al. 2014) and the R1 gradient
penalty on real data (Mescheder et al. 2018), as StyleGAN2 uses them.

    D:  softplus(D(fake)) + softplus(-D(real))   [+ gamma / 2 * ||grad_x D(real)||^2, lazily]
    G:  softplus(-D(fake))

R1 is applied lazily (Karras et al. 2020, section 3.1): every ``r1_every`` discriminator steps, with
its weight multiplied by ``r1_every`` so its average strength is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Mean over the batch of softplus(D(fake)) + softplus(-D(real)) = -log(1 - sigmoid(fake)) - log sigmoid(real)."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss: mean of softplus(-D(fake)) = -log sigmoid(D(fake))."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """Per example, ||d(sum of logits) / d real_i||^2 (B,), kept differentiable for the D update.
    ``real`` must be the leaf that ``real_logits`` were computed from (``requires_grad``). Gradients are
    of the summed logits, as in StyleGAN2, so a D that looks at the whole batch (minibatch stddev)
    gets its cross terms too."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1)
