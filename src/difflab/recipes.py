"""Named training recipes: a network preset plus the config values that make one complete recipe
(objective, schedule, optimiser, EMA, augmentation, and the sampler the run will use by default).

``difflab train --recipe NAME`` applies one; :func:`difflab.config.resolve_config` puts it above the
preset and below a TOML file, flags and ``key=value`` overrides, so anything a recipe sets can still
be changed. The run's config records the recipe's name (``recipe``) and carries its values, so a run
never depends on this table after it is made.

The ``hw-*`` rungs reproduce the anime-face homework's baseline ladder (ML2023 Spring HW6, whose
sample code is lucidrains' denoising-diffusion-pytorch) as closely as difflab's parts allow; each
difference is named in the recipe's ``notes``. ``best`` is difflab's own recipe for a CPU budget of
minutes at 32 px, kept because it measured best (BENCHMARKS.md, "The homework ladder").
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from difflab.errors import ConfigError

__all__ = ["RECIPES", "Recipe", "recipe", "recipe_names"]


@dataclass(frozen=True)
class Recipe:
    """``preset``: the network preset (``--preset`` replaces it); ``overrides``: ``key=value`` config
    settings, the same syntax as the command line's; ``notes``: how it relates to its source."""

    name: str
    summary: str
    preset: str
    overrides: tuple[str, ...]
    notes: tuple[str, ...] = ()


# The course's sample code (lucidrains' Unet + GaussianDiffusion + Trainer, as configured by the
# homework): Unet(dim=16, dim_mults=(1, 2, 4)) with ResnetBlock groups 8, linear attention in every
# down/up level and full attention in the middle; T = 100 linear betas (lucidrains scales 1e-4..0.02
# by 1000 / T, as difflab does); eps prediction, MSE; batch 16; Adam(lr 1e-3, betas (0.9, 0.99)), no
# warm-up, no decay, gradient norm clipped at 1; EMA 0.995 applied every 10 steps (a half-life of
# ln 0.5 / ln 0.995 * 10 = 1383 steps = 22,125 images); no augmentation; ancestral DDPM sampling
# over all T steps.
_HW_NETWORK = (  # feature-map sizes are stated for 32 px; they move with --image-size
    "model.image_size=32", "model.base_channels=16", "model.channel_mults=1,2,4", "model.num_res_blocks=2",
    "model.attention_resolutions=8", "model.linear_attention_resolutions=32,16", "model.head_channels=16",
    "model.norm_groups=8", "model.norm_group_channels=0", "model.dropout=0",
)
_HW_OPTIMISER = (
    "train.batch_size=16", "train.lr=1e-3", "train.adam_beta1=0.9", "train.adam_beta2=0.99",
    "train.warmup_steps=0", "train.lr_decay=none", "train.grad_clip=1", "train.weight_decay=0",
    "train.ema_halflife_images=22125",
)
_HW_OBJECTIVE = ("loss.prediction=eps", "loss.loss=l2", "loss.weighting=none", "schedule.kind=linear")
# torchvision's RandomHorizontalFlip, RandomRotation(10) and ColorJitter(0.25, 0.25, ...), in the
# parts difflab's augment has: brightness here is an additive offset in [-1, 1] units, not a factor,
# and there is no saturation or hue jitter.
_HW_AUGMENT = ("data.augment.hflip=true", "data.augment.rotate_degrees=10",
               "data.augment.brightness=0.25", "data.augment.contrast=0.25")
_HW_NOTES = (
    "network: difflab's UNet at lucidrains' widths (16, 32, 64), 2 blocks per level, linear attention at "
    "32 and 16 px, softmax attention at 8 px and in the middle; lucidrains' blocks differ in detail "
    "(weight-standardised convolutions, RMSNorm in attention)",
    "EMA: difflab's half-life form with its early ramp, not ema-pytorch's every-10-steps update",
)

_RECIPES = [
    Recipe(
        "hw-simple", "the homework's sample code: T = 100, tiny UNet, batch 16, no augmentation",
        "small", _HW_NETWORK + _HW_OPTIMISER + _HW_OBJECTIVE + (
            "schedule.timesteps=100", "sampler.sampler=ddpm", "sampler.steps=None",
        ), _HW_NOTES,
    ),
    Recipe(
        "hw-medium", "hw-simple + augmentation (flip, rotation 10, colour jitter 0.25) and T = 1000",
        "small", _HW_NETWORK + _HW_OPTIMISER + _HW_OBJECTIVE + _HW_AUGMENT + (
            "schedule.timesteps=1000", "sampler.sampler=ddim", "sampler.steps=50", "sampler.eta=1",
        ), _HW_NOTES + (
            "sampling: DDIM with eta 1 on 50 of the 1000 steps (ancestral sampling on a sub-grid) instead of "
            "DDPM's 1000, 20x cheaper; on a 20-minute difflab run it scored FID 174 (BENCHMARKS.md, recipe "
            "comparison), SDE-DPM-Solver++(2M) 20 steps and DDPM-1000 186 on a 25-minute one",
        ),
    ),
    Recipe(
        "hw-strong", "hw-medium + cosine schedule and a wider UNet (32, 64, 128)",
        "small", _HW_NETWORK + _HW_OPTIMISER + _HW_OBJECTIVE + _HW_AUGMENT + (
            "model.base_channels=32", "schedule.kind=cosine", "schedule.timesteps=1000",
            "sampler.sampler=ddim", "sampler.steps=50", "sampler.eta=1",
        ), _HW_NOTES + (
            "the course leaves 'strong' to the student (beta schedule and channels / dim_mults); this rung "
            "takes the two most common answers: the cosine schedule and doubled widths",
        ),
    ),
    Recipe(
        "best", "difflab's recipe for minutes of CPU at 32 px: the small UNet with one block per level",
        "small", (
            "model.num_res_blocks=1", "train.batch_size=64", "train.lr=1e-3", "train.warmup_steps=200",
            "sampler.sampler=ddim", "sampler.steps=50", "sampler.eta=1",
        ), (
            "one block per level instead of two: 1.48x the steps per minute; after 6 CPU-minutes FID 236.4 "
            "against 251.5 with two (n = 1000, BENCHMARKS.md, the homework ladder's objective options)",
        ),
    ),
]

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})


def recipe_names() -> list[str]:
    return list(RECIPES)


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
