"""The configuration of a KL-autoencoder run (latent diffusion's first stage): frozen dataclasses, saved
as the run's ``config.json`` with ``"family": "autoencoder"`` (how :func:`is_autoencoder_config` tells it
from diffusion and GAN runs).

Resolution order as for the other families: defaults < ``--config FILE.toml`` < flags < ``key=value``
overrides (``net.width=48``, ``loss.kl_weight=1e-5``, ``train.holdout=100``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difflab.config import DataConfig, JsonConfig, apply_overrides, from_dict, merge_sections, to_dict
from difflab.data.augment import AugmentConfig
from difflab.errors import ConfigError, parse_choice
from difflab.precision import Precision

FAMILY = "autoencoder"
DOWNSAMPLES = (4, 8)  # 2 or 3 halvings


def _positive_ints(obj: object, section: str, names: Sequence[str], minimum: int = 1) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = "a positive" if minimum == 1 else "a non-negative" if minimum == 0 else f"an >= {minimum}"
            raise ConfigError(f"{section}.{name} must be {what} integer, got {v!r}")


def _nonneg(obj: object, section: str, names: Sequence[str]) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ConfigError(f"{section}.{name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class AENetConfig:
    """Encoder and decoder sizes: ``width`` channels at full resolution, doubled at each of the
    log2(``downsample``) halvings and capped at ``max_width``; ``res_blocks`` residual blocks per level;
    an optional self-attention block in the middle (the lowest resolution). The latent has
    ``latent_channels`` channels at 1/``downsample`` of the image size. ``disc_width``: the PatchGAN
    discriminator's first width (used only when ``loss.disc_weight`` > 0)."""

    latent_channels: int = 4
    downsample: int = 4
    # 16: on 64 px anime faces, 1.5 CPU-minutes reach a held-out PSNR of 19.6 dB against 18.4 for width 32
    # (2.7x the images/s; BENCHMARKS.md, latent diffusion)
    width: int = 16
    max_width: int = 128
    res_blocks: int = 1
    attention: bool = False
    disc_width: int = 32

    def __post_init__(self) -> None:
        _positive_ints(self, "net", ("latent_channels", "downsample", "width", "max_width", "res_blocks", "disc_width"))
        if self.downsample not in DOWNSAMPLES:
            raise ConfigError(f"net.downsample must be 4 or 8 (the latent is 1/4 or 1/8 of the image size), "
                              f"got {self.downsample}")
        if not isinstance(self.attention, bool):
            raise ConfigError(f"net.attention must be true or false, got {self.attention!r}")
        for name in ("width", "max_width", "disc_width"):
            if getattr(self, name) % 8:
                raise ConfigError(f"net.{name} must be a multiple of 8 (GroupNorm groups), got {getattr(self, name)}")

    @property
    def levels(self) -> int:
        """Number of 2x down (and up) stages."""
        return self.downsample.bit_length() - 1

    def channels(self, level: int) -> int:
        """Channels at ``level`` (0 = full resolution)."""
        return min(self.width * 2 ** level, self.max_width)


@dataclass(frozen=True)
class AELossConfig:
    """LDM's ``LPIPSWithDiscriminator`` without the perceptual term: per example, ``l1`` x the summed
    absolute error + ``kl_weight`` x the KL to N(0, I) (summed over the latent), + once step >= ``disc_start``
    and ``disc_weight`` > 0, ``disc_weight`` x the adaptive weight x the hinge generator loss. The adaptive
    weight is ||grad rec|| / ||grad gan|| at the decoder's last layer (clamped to [0, 1e4]), or 1 without
    ``adaptive_disc_weight``."""

    l1: float = 1.0
    kl_weight: float = 1e-6
    disc_weight: float = 0.0
    disc_start: int = 2000
    adaptive_disc_weight: bool = True

    def __post_init__(self) -> None:
        _nonneg(self, "loss", ("l1", "kl_weight", "disc_weight"))
        _positive_ints(self, "loss", ("disc_start",), minimum=0)
        if not isinstance(self.adaptive_disc_weight, bool):
            raise ConfigError(f"loss.adaptive_disc_weight must be true or false, got {self.adaptive_disc_weight!r}")
        if self.l1 == 0:
            raise ConfigError("loss.l1 must be positive: without it nothing is reconstructed")

    @property
    def disc(self) -> bool:
        return self.disc_weight > 0


@dataclass(frozen=True)
class AETrainConfig:
    batch_size: int = 32
    # the autoencoder's and the discriminator's Adam; 5e-4: 20.5 dB against 19.6 for LDM's 2e-4 after 1.5
    # CPU-minutes at width 16 (64 px anime faces, BENCHMARKS.md, latent diffusion)
    lr: float = 5e-4
    adam_beta1: float = 0.5  # LDM's (0.5, 0.9)
    adam_beta2: float = 0.9
    max_steps: int = 100_000
    minutes: float = 0.0  # wall-clock budget of one invocation; 0 = none
    seed: int = 0
    ema_halflife_images: float = 10_000.0  # difflab.train.ema
    ema_rampup: float = 0.05
    log_every: int = 50
    sample_every: int = 500  # 0 disables the previews
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    precision: Precision = Precision.AUTO  # fp32 or bf16 autocast (auto: bf16 where native); not fp16
    channels_last: bool = True
    # the last `holdout` images of the data (sorted order) are never trained on; the final report's
    # reconstruction PSNR / FID are measured on them
    holdout: int = 500

    def __post_init__(self) -> None:
        _positive_ints(self, "train", ("batch_size", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints"))
        _positive_ints(self, "train", ("sample_every", "holdout"), minimum=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"train.seed must be an integer, got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ConfigError(f"train.lr must be positive, got {self.lr!r}")
        _nonneg(self, "train", ("minutes", "ema_halflife_images", "ema_rampup"))
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("train.adam_beta1 and train.adam_beta2 must be in [0, 1)")
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "train.precision"))
        if self.precision is Precision.FP16:
            raise ConfigError("train.precision=fp16 is not supported for the autoencoder; use bf16, fp32 or auto")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"train.channels_last must be true or false, got {self.channels_last!r}")


@dataclass(frozen=True)
class AutoencoderConfig(JsonConfig):
    family: str = FAMILY
    net: AENetConfig = field(default_factory=AENetConfig)
    # mirrored images by default, as for the GANs: twice the data for symmetric subjects such as faces
    data: DataConfig = field(default_factory=lambda: DataConfig(channels=3, augment=AugmentConfig(hflip=True)))
    loss: AELossConfig = field(default_factory=AELossConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ConfigError(f"an autoencoder config has family {FAMILY!r}, got {self.family!r}")
        if self.data.channels != 3:
            raise ConfigError(f"data.channels must be 3 for the autoencoder (RGB), got {self.data.channels}")
        if self.data.labels != "none":
            raise ConfigError("the autoencoder is unconditional: --labels is for diffusion runs (difflab train)")
        size, ds = self.data.image_size, self.net.downsample
        if size % ds or size // ds < 2:
            raise ConfigError(f"--image-size {size}: must be a multiple of --downsample {ds} with a latent of at least "
                              f"2 x 2 (e.g. 32 or 64)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)



def is_autoencoder_config(d: Mapping[str, Any]) -> bool:
    return d.get("family") == FAMILY


def resolve_autoencoder_config(
    *,
    toml: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> AutoencoderConfig:
    """Defaults < TOML < flags (``{"net.downsample": 8, ...}``, None = not given) < ``key=value`` overrides."""
    raw = to_dict(AutoencoderConfig())
    merge_sections(raw, (toml or {}), flags)
    return apply_overrides(from_dict(AutoencoderConfig, raw), overrides)
