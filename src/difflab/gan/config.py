"""The configuration of a GAN run: frozen dataclasses, saved as the run's ``config.json``.

A GAN run directory looks like a diffusion run's (config.json, checkpoints/, model.safetensors = the
raw generator, ema.safetensors = the EMA generator, log.jsonl, samples/); its config says
``"family": "gan"`` and ``"kind": "stylegan" | "ddgan"``, which is how :func:`is_gan_config` tells the
two apart. Resolution order as for diffusion runs: defaults < ``--preset`` < ``--config FILE.toml`` <
flags < ``key=value`` overrides (``train.r1_gamma=0.05``, ``net.width=48``, ``schedule.kind=cosine``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from difflab.config import DataConfig, JsonConfig, apply_overrides, from_dict, merge_sections, to_dict
from difflab.data.augment import AugmentConfig
from difflab.errors import ConfigError, parse_choice
from difflab.gan.diffaug import OPS as DIFFAUG_OPS
from difflab.schedule import BetaSchedule, ScheduleConfig

FAMILY = "gan"


class GANKind(str, Enum):
    STYLEGAN = "stylegan"  # StyleGAN2-style: mapping network, modulated convolutions, noise inputs
    DDGAN = "ddgan"  # denoising-diffusion GAN (Xiao et al. 2022): T conditional GAN steps on a diffusion schedule




@dataclass(frozen=True)
class GANNetConfig:
    """The networks' sizes. Feature maps of resolution r have ``min(width * size / r, max_width)``
    channels (``width`` at full resolution, doubled at each halving), in the generator and the
    discriminator alike; the synthesis runs 4 -> 8 -> ... -> size."""

    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4
    width: int = 32
    max_width: int = 128
    mbstd_group: int = 4  # minibatch standard deviation over groups of this many images (D's last block)

    def __post_init__(self) -> None:
        for name in ("z_dim", "w_dim", "mapping_layers", "width", "max_width", "mbstd_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"net.{name} must be a positive integer, got {v!r}")

    def channels_at(self, res: int, size: int) -> int:
        return min(self.width * (size // res), self.max_width)


@dataclass(frozen=True)
class GANTrainConfig:
    batch_size: int = 32
    lr_g: float = 2e-3
    lr_d: float = 2e-3
    adam_beta1: float = 0.0  # StyleGAN2's Adam (0, 0.99)
    adam_beta2: float = 0.99
    # R1 on the real images (Mescheder et al. 2018), lazily (Karras et al. 2020): every r1_every D steps,
    # weighted by r1_every; 0 disables it
    r1_gamma: float = 0.02
    r1_every: int = 16
    style_mixing: float = 0.9  # stylegan: probability of mixing two latents' styles at a random layer
    # DiffAugment (Zhao et al. 2020) on everything D sees, real and fake: comma list of color, translation,
    # cutout; "" = none (the ddgan kind's default, KIND_TRAINING)
    diffaug: str = "color,translation,cutout"
    ema_halflife_images: float = 10_000.0  # generator EMA, half-life in images (difflab.train.ema)
    ema_rampup: float = 0.05
    max_steps: int = 100_000
    minutes: float = 0.0  # wall-clock budget of one invocation; 0 = none
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500  # 0 disables the periodic sample grid
    sample_grid_size: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # a collapsed discriminator: G's loss (softplus(-D(fake))) averaged over a log interval above
    # collapse_g_loss for collapse_logs intervals in a row stops training (0 = never)
    collapse_g_loss: float = 8.0
    collapse_logs: int = 20

    def __post_init__(self) -> None:
        for name in ("batch_size", "r1_every", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                     "collapse_logs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {v!r}")
        for name in ("sample_every", "sample_grid_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"train.{name} must be a non-negative integer, got {v!r}")
        for name in ("lr_g", "lr_d"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("r1_gamma", "minutes", "ema_halflife_images", "ema_rampup", "collapse_g_loss"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("train.adam_beta1 and train.adam_beta2 must be in [0, 1)")
        if not 0 <= self.style_mixing <= 1:
            raise ConfigError(f"train.style_mixing must be in [0, 1], got {self.style_mixing}")
        diffaug_policy(self.diffaug)

    @property
    def policy(self) -> tuple[str, ...]:
        return diffaug_policy(self.diffaug)


def diffaug_policy(text: str) -> tuple[str, ...]:
    ops = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [p for p in ops if p not in DIFFAUG_OPS]
    if bad:
        raise ConfigError(f"train.diffaug: unknown operation {bad[0]!r}; a comma list of {', '.join(DIFFAUG_OPS)}, or empty")
    return ops


def _ddgan_schedule() -> ScheduleConfig:
    # a cosine abar curve sampled at T = 4 points: abar = 0.85, 0.50, 0.15, 1.5e-4 (x_{T-1} is noise);
    # the beta-range kinds (linear, ...) cannot be this short
    return ScheduleConfig(kind=BetaSchedule.COSINE, timesteps=4)


@dataclass(frozen=True)
class GANConfig(JsonConfig):
    family: str = FAMILY
    kind: GANKind = GANKind.STYLEGAN
    preset: str = "small"
    net: GANNetConfig = field(default_factory=GANNetConfig)
    # mirrored reals by default (StyleGAN's --mirror): twice the data for symmetric subjects such as faces
    data: DataConfig = field(default_factory=lambda: DataConfig(channels=3, augment=AugmentConfig(hflip=True)))
    train: GANTrainConfig = field(default_factory=GANTrainConfig)
    schedule: ScheduleConfig = field(default_factory=_ddgan_schedule)  # ddgan only: T = schedule.timesteps

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ConfigError(f"a GAN config has family {FAMILY!r}, got {self.family!r}")
        object.__setattr__(self, "kind", parse_choice(GANKind, self.kind, "--kind"))
        size = self.data.image_size
        if size not in (8, 16, 32, 64, 128, 256):
            raise ConfigError(f"--image-size {size}: a GAN needs a power of two from 8 to 256 (e.g. 32 or 64)")
        if self.data.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3 in a resolved GAN config, got {self.data.channels}")
        if self.data.labels != "none":
            raise ConfigError("GAN runs are unconditional: --labels is for diffusion runs (difflab train)")
        if self.kind is GANKind.DDGAN and not 1 <= self.schedule.timesteps <= 16:
            raise ConfigError(f"--steps {self.schedule.timesteps}: a denoising-diffusion GAN takes 1 to 16 steps (2 or 4 usual)")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2 (the discriminator's minibatch statistics)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)

    @property
    def steps(self) -> int:
        """Network calls per image: T for ddgan, 1 for stylegan."""
        return self.schedule.timesteps if self.kind is GANKind.DDGAN else 1



def is_gan_config(d: Mapping[str, Any]) -> bool:
    return d.get("family") == FAMILY


# A preset: network sizes and the training options that suit them. 'small' is for a CPU (measured
# about 1-2 steps/s of batch 32 at 32 px on one core of the project's 2-core CPU, the StyleGAN kind; DDGAN
# about half that); 'default' is StyleGAN2-sized (512-wide w, 8 mapping layers, up to 512 channels) for a GPU.
PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "small": {"net": {"z_dim": 128, "w_dim": 128, "mapping_layers": 4, "width": 32, "max_width": 128},
              "train": {"batch_size": 32}},
    "default": {"net": {"z_dim": 512, "w_dim": 512, "mapping_layers": 8, "width": 128, "max_width": 512},
                "train": {"batch_size": 64}},
}


# Per kind: the DDGAN discriminator sees (x_{t-1}, x_t) pairs whose noise already hides the images, and
# DiffAugment on top slowed its learning 3-5x in a measurement (16 px anime faces, 2 CPU-minutes: face
# shapes without it, blobs with it); Xiao et al. do not use it either. Style mixing is StyleGAN's own.
KIND_TRAINING: Mapping[GANKind, Mapping[str, Any]] = {
    GANKind.STYLEGAN: {},
    GANKind.DDGAN: {"diffaug": "", "style_mixing": 0.0},
}


def resolve_gan_config(
    *,
    kind: str | GANKind | None = None,
    preset: str | None = None,
    toml: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> GANConfig:
    """Defaults < preset < TOML < flags (``{"train.lr_g": 1e-3, ...}``, None = not given) < overrides.
    ``data.channels`` 0 (automatic) becomes 1 for fashion-mnist and 3 otherwise."""
    raw = to_dict(GANConfig())
    toml = dict(toml or {})
    name = preset or toml.pop("preset", None) or "small"
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    raw["preset"] = name
    for section, values in PRESETS[name].items():
        raw[section].update(values)
    raw["data"]["channels"] = 0
    raw["kind"] = parse_choice(GANKind, kind or toml.get("kind") or GANKind.STYLEGAN, "--kind").value
    raw["train"].update(KIND_TRAINING[GANKind(raw["kind"])])
    merge_sections(raw, toml, flags)
    if raw["data"].get("channels", 0) == 0:  # resolved below, after the overrides; 3 keeps the check quiet
        raw["data"]["channels"], auto = 3, True
    else:
        auto = False
    cfg = apply_overrides(from_dict(GANConfig, raw), overrides)
    if auto and not any(o.split("=", 1)[0].strip() == "data.channels" for o in overrides):
        channels = 1 if cfg.data.source == "fashion-mnist" else 3
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channels=channels))
    return cfg

