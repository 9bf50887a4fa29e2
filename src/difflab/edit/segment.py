"""Segmentation by diffusion (SegDiff, Amit et al. 2021): a diffusion model whose sample is a
segmentation mask, conditioned on the image it segments (:class:`difflab.config.SegmentConfig`).

The mask x_0 of K classes is its K-channel one-hot scaled to [-1, 1] (:func:`onehot`), so the
diffusion runs on K channels (``model.in_channels`` = K, fine for K up to ~16; analog bits would be
needed for many more classes, not built); a sample's mask is its argmax over the channels
(:func:`to_mask`). The image reaches the network as ``lowres``, the conditioning input the
super-resolution runs use (:class:`difflab.models.unet.UNetConfig` ``cond_channels``, ``cond_mode``).

Sampling (:func:`segment_batches`): sample k of image i is sample i * samples + k of the set, with
seed (seed, i * samples + k), so results do not depend on the batch size. Several samples per image
are ensembled by majority vote (:func:`vote`: each sample's argmax mask is one vote per pixel; the
ensembled mask is the class with the most votes, ties going to the lowest class index), and the
per-pixel entropy of the vote distribution, divided by log K so it spans 0..1, is the uncertainty
(:func:`entropy`).

The plain segmenter (``segment.objective=ce``, the baseline at equal compute): the same UNet, one
pass from an all-zero x at t = 0 with the image as ``lowres``; its K output channels are logits
(:func:`ce_logits`), trained with cross-entropy (:func:`ce_loss`); its uncertainty is the entropy of
the softmax.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from difflab.denoiser import Denoiser
from difflab.errors import ConfigError, DataError
from difflab.precision import autocast_context
from difflab.samplers.base import Callback
from difflab.samplers.run import SamplerConfig, sample_batches

__all__ = ["ce_logits", "ce_loss", "entropy", "onehot", "segment_batches", "to_mask", "uncertainty_u8", "vote"]


def onehot(mask: Tensor, num_classes: int) -> Tensor:
    """Class-index masks (N, H, W) -> float32 (N, K, H, W): 1 at the pixel's class, -1 elsewhere."""
    m = mask.long()
    if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_classes):
        raise DataError(f"a mask holds class index {int(m.max()) if int(m.max()) >= num_classes else int(m.min())}, "
                        f"outside 0..{num_classes - 1} (the run's {num_classes} classes)")
    return F.one_hot(m, num_classes).permute(0, 3, 1, 2).float() * 2 - 1


def to_mask(x: Tensor) -> Tensor:
    """Sampled one-hot masks or logits (N, K, H, W) -> class indices (N, H, W), uint8: the argmax
    over the channels (ties: the lowest class)."""
    return x.float().argmax(dim=1).to(torch.uint8)


def vote(masks: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Majority vote of M masks (M, H, W) of one image: (the ensembled mask (H, W) uint8, the vote
    distribution (K, H, W) float, the fraction of masks choosing each class). Ties go to the lowest
    class index (:func:`torch.argmax` returns the first maximum)."""
    probs = F.one_hot(masks.long(), num_classes).float().mean(0).permute(2, 0, 1)
    return probs.argmax(0).to(torch.uint8), probs


def entropy(probs: Tensor) -> Tensor:
    """Per-pixel entropy of class distributions (K, H, W) (or (N, K, H, W)) divided by log K: 0 where
    one class has all the mass, 1 where the classes are equally likely."""
    k = probs.shape[-3]
    h = -torch.special.xlogy(probs, probs).sum(-3)
    return (h / math.log(k)).clamp(0, 1)


def uncertainty_u8(probs: Tensor) -> Tensor:
    """:func:`entropy` as a grey uint8 image (1, H, W): 0 = certain, 255 = the classes equally likely."""
    return (entropy(probs) * 255).round().to(torch.uint8)[None]


def ce_logits(model: Callable[..., Tensor], images: Tensor, num_classes: int, *, autocast: torch.dtype | None = None,
              memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """The plain segmenter's logits (N, K, H, W), float32: one pass of the network from an all-zero x
    at t = 0, with ``images`` (N, 3, H, W) in [-1, 1] as its ``lowres`` input; the network call alone
    runs under ``autocast``."""
    n, _, h, w = images.shape
    x = torch.zeros((n, num_classes, h, w), device=images.device).contiguous(memory_format=memory_format)
    t = torch.zeros(n, device=images.device)
    with autocast_context(images.device, autocast):
        out = model(x, t, lowres=images.contiguous(memory_format=memory_format))
    return out.float()


def ce_loss(model: Callable[..., Tensor], images: Tensor, masks: Tensor, num_classes: int, *,
            autocast: torch.dtype | None = None,
            memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Per-example cross-entropy (B,) of :func:`ce_logits` against class-index ``masks`` (B, H, W),
    averaged over the pixels."""
    logits = ce_logits(model, images, num_classes, autocast=autocast, memory_format=memory_format)
    return F.cross_entropy(logits, masks.long().to(logits.device), reduction="none").mean(dim=(1, 2))


def segment_batches(denoiser: Denoiser, images: Tensor, num_classes: int, sampler: SamplerConfig, *,
                    samples: int = 1, seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
                    progress: bool = True, callback: Callback = None, **kwargs: Any) -> Iterator[tuple[range, Tensor]]:
    """Yield (sample indices, sampled one-hot masks (b, K, H, W) in [-1, 1]) for ``images`` (N, 3, H, W)
    in [-1, 1], ``samples`` per image: sample k of image i is index i * samples + k, drawn from seed
    (seed, i * samples + k) whatever the batch size. Images are taken a few at a time (about
    ``batch_size`` samples, whole images), so memory does not grow with N; the progress bar counts images."""
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"segmentation takes RGB images (N, 3, H, W), got {tuple(images.shape)}")
    shape = (num_classes, *images.shape[2:])
    per = max(1, batch_size // samples)
    bar = tqdm(total=len(images), desc=f"segmenting ({sampler.sampler.value})", unit="img", disable=not progress)
    for i0 in range(0, len(images), per):
        chunk = images[i0:i0 + per]
        cond = chunk.repeat_interleave(samples, 0)
        yield from sample_batches(denoiser, len(cond), shape, sampler, seed=seed, start=i0 * samples,
                                  batch_size=batch_size, device=device, progress=False, callback=callback,
                                  lowres=cond, **kwargs)
        bar.update(len(chunk))
    bar.close()
