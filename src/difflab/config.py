"""The run configuration: typed, frozen dataclasses, one per concern, gathered in :class:`RunConfig`.

A run's config is resolved in this order: defaults < ``--preset`` < ``--config FILE.toml`` <
command-line flags < ``key=value`` overrides (dotted: ``train.lr=1e-4``,
``model.channel_mults=1,2,2``, ``schedule.kind=cosine``). The resolved config is saved as JSON into
the run directory and is everything needed to rebuild the network, the schedule and training.
``RunConfig.from_dict(cfg.to_dict()) == cfg`` holds exactly (tested).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from difflab.conditioning import CondConfig, TextMode
from difflab.data.augment import AugmentConfig
from difflab.data.decode import _shown
from difflab.data.labels import LabelSchema
from difflab.data.paired import PairAugment
from difflab.errors import ConfigError, parse_choice
from difflab.models.foreign import ForeignNetwork
from difflab.models.presets import PRESETS as MODEL_PRESETS
from difflab.models.presets import unet_config
from difflab.models.unet import UNetConfig
from difflab.parametrization import LossConfig, Prediction
from difflab.precision import Precision
from difflab.recipes import recipe as get_recipe
from difflab.samplers import SamplerConfig, SamplerKind
from difflab.schedule import ScheduleConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


_C = typing.TypeVar("_C", bound="JsonConfig")


class JsonConfig:
    """The JSON form of a run's top-level config (a frozen dataclass; diffusion, GAN and autoencoder runs
    alike): ``cls.from_dict(cfg.to_dict()) == cfg`` and ``cls.load(path)`` reads a run's config.json."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        return from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls: type[_C], path: str | Path) -> _C:
        return cls.from_dict(read_config_json(path))


class LRDecay(str, Enum):
    NONE = "none"
    COSINE = "cosine"


@dataclass(frozen=True)
class DataConfig:
    """``source`` is ``fashion-mnist`` or a folder of images; ``channels`` 0 means the source's own.
    ``labels``: ``none``, ``classes`` (the built-in data set's own), ``folders`` (one sub-folder per class)
    or a CSV file of ``image,attribute...`` rows (:mod:`difflab.data.labels_csv`)."""

    source: str = "fashion-mnist"
    image_size: int = 32
    channels: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    labels: str = "none"

    def __post_init__(self) -> None:
        if self.labels not in ("none", "classes", "folders") and not self.labels.lower().endswith(".csv"):
            raise ConfigError(f"--labels must be classes, folders or a .csv file, got {self.labels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"--image-size must be an integer >= 8, got {self.image_size!r}")
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels must be 0 (automatic), 1 or 3, got {self.channels!r}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 200
    lr_decay: LRDecay = LRDecay.NONE
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # a step whose loss or gradient is not finite is skipped (no update; counted in the log); this many
    # in a row stop the run, saving nothing, with a message naming the last good checkpoint
    max_nonfinite_steps: int = 8
    grad_accum: int = 1
    max_steps: int = 20_000
    minutes: float = 0.0  # wall-clock budget of one invocation; 0 = none
    # EMA as in Karras et al. 2022 (EDM): half-life in images, ramped up early in training
    ema_halflife_images: float = 50_000.0
    ema_rampup: float = 0.05
    seed: int = 0
    precision: Precision = Precision.AUTO
    channels_last: bool = True
    log_every: int = 50
    sample_every: int = 1000  # 0 disables the periodic sample grid
    sample_grid_size: int = 16
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    tensorboard: bool = False  # also log scalars and sample grids to RUN/tensorboard (needs tensorboard)
    # torch.compile the network for the training step (inductor; needs a C++ compiler on CPU). Off by
    # default: on the project's 2-core CPU it did not pay (BENCHMARKS.md, "torch.compile")
    compile: bool = False
    # classifier-free guidance needs an unconditional model too: each example loses its condition with
    # this probability (and each label attribute on its own, difflab.conditioning.drop)
    cond_dropout: float = 0.1
    # recompute each UNet level's activations in the backward pass instead of keeping them: less memory
    # for big presets on a GPU, about a third more compute; the same gradients
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_decay", parse_choice(LRDecay, self.lr_decay, "train.lr_decay"))
        if not isinstance(self.grad_checkpoint, bool):
            raise ConfigError(f"train.grad_checkpoint must be true or false, got {self.grad_checkpoint!r}")
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "train.precision"))
        positive = ["batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "max_steps",
                    "max_nonfinite_steps"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ["warmup_steps", "sample_every", "sample_grid_size"]:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        for name in ["weight_decay", "grad_clip", "minutes", "ema_halflife_images", "ema_rampup"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and 0 <= self.min_lr_ratio <= 1):
            raise ConfigError("train.adam_beta1/adam_beta2 must be in [0, 1) and min_lr_ratio in [0, 1]")
        if not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"train.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum} "
                              "(each optimizer step adds up grad_accum equal micro-batches)")


@dataclass(frozen=True)
class UpscaleConfig:
    """A super-resolution run (``difflab train --task upscale --from S``): the network learns the
    ``image_size`` image given its ``from_size`` version (downscaled with antialiasing, upsampled back
    bicubically, concatenated to its input). ``from_size`` 0 = an ordinary generative run.

    ``residual``: the diffusion models the residual (image - bicubic upsampling of its low-resolution
    version) rather than the image (SRDiff, Li et al. 2022), so a network that predicts nothing leaves
    the bicubic upsampling. ``noise``: training augmentation of the low-resolution input, Gaussian noise
    of a standard deviation drawn per image from U[0, noise] (cascaded diffusion's conditioning
    augmentation, Ho et al. 2021, without conditioning on the level), so the stage tolerates the
    base model's flaws; 0 = off. Sampling never adds it.

    ``scale``: the residual is multiplied by this before the diffusion sees it (divided after
    sampling), like latent diffusion's latent scaling: a 32 -> 64 px residual of anime faces has a
    standard deviation of about 0.11 against the images' 0.56, so unscaled it is drowned by noise at
    most noise levels the schedule trains on (measured, BENCHMARKS.md image-to-image). 0 = measured
    when training starts (``loss.sigma_data`` / the residuals' std over the first training images,
    :func:`difflab.edit.upscale.measure_scale`) and stored in the run's config. Runs saved before
    this option existed load with 1 (what they were trained with)."""

    from_size: int = 0
    residual: bool = True
    noise: float = 0.0
    scale: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.from_size, bool) or not isinstance(self.from_size, int) or self.from_size < 0:
            raise ConfigError(f"upscale.from_size (--from) must be a positive integer, got {self.from_size!r}")
        if not isinstance(self.residual, bool):
            raise ConfigError(f"upscale.residual must be true or false, got {self.residual!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise <= 1:
            raise ConfigError(f"upscale.noise must be a number in [0, 1], got {self.noise!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 <= self.scale < math.inf:
            raise ConfigError("upscale.scale must be a finite number >= 0 (0 = measured when training starts), "
                              f"got {self.scale!r}")

    @property
    def active(self) -> bool:
        return self.from_size > 0


@dataclass(frozen=True)
class LatentConfig:
    """A latent-diffusion run (``difflab train --latent-of AE_RUN``; Rombach et al. 2022): the UNet
    (``model.*``: ``channels`` channels at ``data.image_size / downsample`` px) learns the
    autoencoder's latents of the ``data.image_size`` images, each channel normalised as
    ``(z - mean) / std`` with the statistics the autoencoder run measured on its training data, so the
    diffusion sees unit-variance latents (and ``loss.sigma_data`` is 1). The autoencoder's EMA weights
    and config are copied into the run (``RUN/autoencoder/``) when training starts, so the run samples on
    its own; ``autoencoder`` and ``step`` record where they came from. ``channels`` 0 = a pixel-space run."""

    autoencoder: str = ""
    step: int = 0
    channels: int = 0
    downsample: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("step", "channels", "downsample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"latent.{name} must be a non-negative integer, got {v!r}")
        if not self.active:
            if self.mean or self.std or self.autoencoder:
                raise ConfigError("latent.mean/std/autoencoder are set but latent.channels is 0 (not a latent run)")
            return
        if self.downsample < 2:
            raise ConfigError(f"latent.downsample must be >= 2 in a latent run, got {self.downsample}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"latent.mean and latent.std need {self.channels} values each (one per latent channel), "
                              f"got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ConfigError("latent.mean must be finite and latent.std finite and positive")

    @property
    def active(self) -> bool:
        return self.channels > 0


#: DDIM eta 1's steps in a latent run unless ``sampler.steps`` is given (a TOML file or an override): on the
#: homework ladder's 64 px latent rung (BENCHMARKS.md, "Sampling a latent run: fewer steps"), n = 1000
#: against the same reference, 20 steps scored FID 121.6 against 127.6 at 50 and 136.3 at 100 after 60
#: CPU-minutes, and 135.3 against 146.6 after 20; 15 and 30 were within 2.3 of 20, 10 was 5 worse. (The
#: pixel-space `best` run at 60 minutes is the other way round: 116.9 at 50 steps, 131.4 at 20.)
LATENT_DDIM_STEPS = 20


class SegObjective(str, Enum):
    """What a segmentation run trains (``segment.objective``, ``difflab train --objective``)."""

    DIFFUSION = "diffusion"  #: a diffusion model of the mask given the image (SegDiff)
    CE = "ce"  #: the plain segmenter: the same UNet, one pass, cross-entropy (the baseline at equal compute)


#: What a segmentation run's network predicts unless ``loss.prediction`` is given: on the 16 px discs of
#: tests/test_segment.py, 300 steps gave held-out mIoU 1.00 predicting v against 0.85 (DDIM 10 steps, eta 0)
#: and 0.95 (eta 1) predicting eps; x0 matched v.
SEGMENT_PREDICTION = Prediction.V


@dataclass(frozen=True)
class SegmentConfig:
    """A segmentation run (``difflab train --task segment``; SegDiff, Amit et al. 2021): the diffusion
    model's sample is a mask of ``classes`` (K of them), conditioned on the image it segments, which
    enters the UNet as ``lowres`` (``model.cond_channels`` = 3, ``model.cond_mode``: ``concat`` as in
    SR3, or SegDiff's ``add``). The mask x_0 is its K-channel one-hot, scaled to [-1, 1] (``onehot * 2
    - 1``), so ``model.in_channels`` = K: fine for the K <= ~16 of ordinary segmentation data; many
    more classes would want analog bits (Chen et al. 2022, log2 K channels), not built. The network
    predicts v unless ``loss.prediction`` is given (:data:`SEGMENT_PREDICTION`, measured).
    :mod:`difflab.edit.segment` holds the encoding, the sampling and the ensembling.

    ``objective``: ``diffusion``, or ``ce``: the plain segmenter at equal compute (the same UNet, one
    pass from an all-zero x at t = 0, its K outputs the logits, cross-entropy against the mask).
    ``val_fraction``: the pairs held out (by id, :func:`difflab.data.paired.split_pairs` with its seed 0,
    so every run of a folder holds out the same pairs), never trained on; the previews show the first of
    them. ``hflip`` and ``crop``: joint augmentation of image and mask
    (:class:`difflab.data.paired.PairAugment`). ``classes`` empty = not a segmentation run."""

    classes: tuple[str, ...] = ()
    objective: SegObjective = SegObjective.DIFFUSION
    val_fraction: float = 0.1
    hflip: bool = False
    crop: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", parse_choice(SegObjective, self.objective, "segment.objective"))
        if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, (tuple, list)):
            raise ConfigError(f"segment.classes must be a list of class names, got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if any(not isinstance(c, str) or not c for c in self.classes):
            raise ConfigError(f"segment.classes must be non-empty names, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"segment.classes names a class twice: {list(self.classes)}")
        if len(self.classes) == 1 or len(self.classes) > 64:
            raise ConfigError(f"a segmentation run needs 2..64 classes (one channel each), got {len(self.classes)}")
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ConfigError(f"segment.val_fraction must be a number in [0, 1), got {v!r}")
        object.__setattr__(self, "val_fraction", float(v))
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"segment.hflip must be true or false, got {self.hflip!r}")
        c = self.crop
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1:
            raise ConfigError(f"segment.crop must be a number in [0, 1), got {c!r}")
        object.__setattr__(self, "crop", float(c))
        if not self.active and (self.hflip or self.crop or self.objective is not SegObjective.DIFFUSION):
            raise ConfigError("segment.objective/hflip/crop are set but this is not a segmentation run "
                              "(difflab train --task segment)")

    @property
    def active(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def augment(self) -> PairAugment:
        """The joint augmentation of image and mask (:func:`difflab.data.paired.joint_augment`)."""
        return PairAugment(hflip=self.hflip, crop=self.crop)


@dataclass(frozen=True)
class RunConfig(JsonConfig):
    model: UNetConfig = field(default_factory=lambda: unet_config("small"))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the run's default sampler (difflab sample with no sampler flags): stochastic DDIM, 50 steps. Measured
    # on anime faces after 20 CPU-minutes (BENCHMARKS.md): FID 174 against 193 for SDE-DPM-Solver++(2M) at
    # 20 steps, while deterministic DDIM (eta 0) draws speckled colour noise from a young model (and
    # leaves a young super-resolution model's errors in: FID 269 against 178 with eta 1, image-to-image)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(eta=1.0))
    cond: CondConfig = field(default_factory=CondConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    preset: str = "small"
    recipe: str = ""  # the --recipe it was made with (difflab.recipes), "" = none; a record only
    # an imported network (difflab import; difflab.models.foreign): built from this table, with model.* recording
    # only its image size and channels; None = difflab's own UNet of model.*
    foreign: ForeignNetwork | None = None
    latent: LatentConfig = field(default_factory=LatentConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def __post_init__(self) -> None:
        lat = self.latent
        if lat.active:
            self._check_latent()
        elif self.model.image_size != self.data.image_size:
            raise ConfigError(
                f"model.image_size={self.model.image_size} differs from data.image_size={self.data.image_size}"
            )
        up = self.upscale
        if up.active and not up.from_size < self.data.image_size:
            raise ConfigError(f"--from {up.from_size} must be smaller than --image-size {self.data.image_size}")
        seg = self.segment
        if seg.active:
            self._check_segment()
        want = self.model.in_channels if up.active else 3 if seg.active else 0
        if self.model.cond_channels != want:
            kind = "super-resolution" if up.active else "segmentation" if seg.active else "generative"
            raise ConfigError(f"model.cond_channels={self.model.cond_channels} but a {kind} run needs {want}")
        schema = self.cond.schema
        if schema is not None and not self.cond.captions and self.model.conditions != schema.sizes:
            raise ConfigError(f"the model takes labels of sizes {list(self.model.conditions)} but the data's labels "
                              f"have {list(schema.sizes)} ({', '.join(schema.attributes)})")
        if self.cond.captions and schema is not None and not self.model.text_dim:
            raise ConfigError("cond.captions needs a model with text_dim > 0 (the text encoder's size)")
        f = self.foreign
        if f is not None and (self.model.image_size, self.model.in_channels) != (f.resolution, f.channels):
            raise ConfigError(f"the imported {f.label} makes {f.channels}-channel {f.resolution} px images, but model.* "
                              f"says {self.model.in_channels}-channel {self.model.image_size} px")

    def _check_latent(self) -> None:
        lat, m, d = self.latent, self.model, self.data
        if d.image_size % lat.downsample or m.image_size != d.image_size // lat.downsample:
            raise ConfigError(f"a latent run of {d.image_size} px images with downsample {lat.downsample} needs "
                              f"model.image_size={d.image_size // lat.downsample}, got {m.image_size}")
        if m.in_channels != lat.channels:
            raise ConfigError(f"model.in_channels={m.in_channels} but the autoencoder's latents have {lat.channels} channels")
        if self.upscale.active:
            raise ConfigError("--latent-of and --task upscale cannot be combined (super-resolution runs are pixel-space)")
        if self.foreign is not None:
            raise ConfigError("an imported network cannot be a latent run")
        aug = d.augment
        if aug.rotate_degrees or aug.brightness or aug.contrast:
            raise ConfigError("a latent run trains on latents encoded once: of the augmentations only data.augment.hflip "
                              "(both orientations are encoded) is possible; set rotate_degrees, brightness and contrast to 0")

    def _check_segment(self) -> None:
        seg, m, d = self.segment, self.model, self.data
        if m.in_channels != seg.num_classes:
            raise ConfigError(f"model.in_channels={m.in_channels} but the segmentation run has {seg.num_classes} classes "
                              "(one one-hot channel each)")
        for other, active in (("--task upscale", self.upscale.active), ("--latent-of", self.latent.active),
                              ("an imported network", self.foreign is not None),
                              ("--labels", d.labels != "none" or self.cond.schema is not None or bool(m.conditions))):
            if active:
                raise ConfigError(f"a segmentation run (--task segment) cannot be combined with {other}")
        if d.channels not in (0, 3):
            raise ConfigError(f"a segmentation run segments RGB images: data.channels must be 0 or 3, got {d.channels}")
        if not d.augment.is_identity:
            raise ConfigError("a segmentation run augments image and mask together: use segment.hflip and segment.crop, "
                              "not data.augment.*")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        raw = read_config_json(path)
        up = raw.get("upscale") if isinstance(raw, dict) else None
        if isinstance(up, dict) and up.get("from_size") and "scale" not in up:  # saved before upscale.scale: unscaled
            raw["upscale"] = {**up, "scale": 1.0}
        return cls.from_dict(raw)


def read_config_json(path: str | Path) -> Any:
    """A run's config.json as parsed JSON, or one ConfigError (unreadable, not UTF-8, not JSON, nested
    too deeply, or an integer of more than 4300 digits)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, or a huge int
        raise ConfigError(f"cannot read run config {path}: {e}") from None


# -- generic dataclass <-> dict, driven by type hints --------------------------------------
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return parse_choice(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return _check_number(float, value, where)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be of type {tp.__name__}, got {value!r}")
    return _check_number(tp, value, where) if tp in (int, float) else value


#: Integer options are 64-bit (as in TOML), so that every option fits a tensor and a float.
_INT_RANGE = 2**63


def _check_number(tp: type, value: int | float, where: str) -> int | float:
    """``value`` as ``tp``; ConfigError for NaN and for integers beyond 64 bits."""
    if isinstance(value, int) and not -_INT_RANGE <= value < _INT_RANGE:
        raise ConfigError(f"{where}: the integer of {len(str(abs(value)))} digits is out of range (at most 2**63 - 1)")
    if tp is float:
        value = float(value)
        if value != value:
            raise ConfigError(f"{where} must be a number, got nan")
    return value


def from_dict(cls: type, d: Any, where: str = "config") -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a table of options, got {d!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(f"unknown option {where}.{_shown(str(unknown[0]))}; valid: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where} needs the option {where}.{missing[0]}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()})


def parse_override_value(tp: Any, text: str, where: str) -> Any:
    """Parse the text of ``key=value`` for a field of type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(None) in args:  # Optional[X] (X | None)
        if text.lower() in ("none", "null", ""):
            return None
        return parse_override_value(next(a for a in args if a is not type(None)), text, where)
    if origin is tuple:
        if text.lstrip().startswith("["):  # a JSON list: items may hold commas and spaces
            try:
                items = json.loads(text)
            except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an int of > 4300 digits
                raise ConfigError(f"{where}: not a JSON list: {e}") from None
            return _coerce(tp, items, where)
        parts = [p.strip() for p in text.split(",") if p.strip()]  # a,b,c (spaces around items dropped)
        return tuple(parse_override_value(args[0], p, where) for p in parts)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} takes true or false, got {text!r}")
    if tp in (int, float):
        try:
            number = tp(float(text)) if tp is int and float(text).is_integer() else tp(text)
        except ValueError:
            raise ConfigError(f"{where} takes a number, got {text!r}") from None
        return _check_number(tp, number, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return parse_choice(tp, text, where)
    return text


def apply_overrides(cfg: Any, overrides: Sequence[str] | Mapping[str, Any]) -> Any:
    """Return ``cfg`` with dotted-key overrides applied (strings parsed by field type)."""
    for key, value in _items(overrides):
        path = key.split(".")
        cfg = _replace_path(cfg, path, _parse(_leaf_type(type(cfg), path, key), value, key))
    return cfg


def _items(overrides: Sequence[str] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    return list(overrides.items()) if isinstance(overrides, Mapping) else [_split(o) for o in overrides]


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=1e-4)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _leaf_type(cls: Any, path: list[str], full: str) -> Any:
    """The type of the field at dotted ``path`` inside dataclass ``cls``; unknown names and groups are errors."""
    tp: Any = cls
    for i, name in enumerate(path):
        names = [f.name for f in dataclasses.fields(tp)]
        if name not in names:
            raise ConfigError(f"unknown option {full!r}: {tp.__name__} has {', '.join(names)}")
        tp = _hints(tp)[name]
        if i < len(path) - 1 and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown option {full!r}")
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{full!r} is a group of options; set one of its fields, e.g. {full}.<name>=...")
    return tp


def _parse(tp: Any, value: Any, full: str) -> Any:
    return parse_override_value(tp, value, full) if isinstance(value, str) else _coerce(tp, value, full)


def _replace_path(obj: Any, path: list[str], new: Any) -> Any:
    inner = new if len(path) == 1 else _replace_path(getattr(obj, path[0]), path[1:], new)
    return dataclasses.replace(obj, **{path[0]: inner})


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--config file {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"--config file {path} is not valid TOML: nested too deeply") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config file {path} is not valid TOML: {e}") from None


# A preset is a network and the training options that suit its size. The small networks take a
# 5x higher learning rate than DDPM's 2e-4 (measured: 5 minutes of anime faces at 32 px with the
# 'small' preset give face shapes at 1e-3 and colour noise at 2e-4); the large ones keep 2e-4.
PRESET_TRAINING: Mapping[str, Mapping[str, Any]] = {
    "tiny": {"lr": 1e-3},
    "small": {"lr": 1e-3},
}


def preset_names() -> list[str]:
    return sorted(MODEL_PRESETS)


def resolve_config(
    *,
    preset: str | None = None,
    recipe: str | None = None,
    toml: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Defaults < preset < recipe < TOML file < flags < overrides. A recipe (:mod:`difflab.recipes`)
    brings its own preset, which ``preset`` (or the TOML's) replaces. The network's image size and
    channels follow the data section (whichever of those set it) unless ``model.image_size`` /
    ``model.in_channels`` are given themselves."""
    base = RunConfig()
    raw = to_dict(base)
    rec = get_recipe(recipe) if recipe else None
    name = preset or (toml or {}).get("preset") or (rec.preset if rec else base.preset)
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ConfigError(f"unknown --preset {name!r}; choose one of {', '.join(preset_names())}")
    raw["model"] = to_dict(MODEL_PRESETS[name])
    raw["train"].update(PRESET_TRAINING.get(name, {}))
    raw["preset"] = name
    toml_sampler = (toml or {}).get("sampler")
    sampler_given = set(toml_sampler) if isinstance(toml_sampler, Mapping) else set()  # sampler options someone named
    named: set[str] = set()  # keys a recipe, the TOML file or an override set (not the defaults)
    if rec is not None:
        raw["recipe"] = rec.name
        named |= _set_overrides(raw, rec.overrides)
        sampler_given |= {k.split(".", 1)[1] for k in named if k.startswith("sampler.")}
    merge_sections(raw, toml, skip=("preset",))
    _check_sections(raw)
    named |= {f"{sec}.{k}" for sec, values in (toml or {}).items() if isinstance(values, Mapping) for k in values}
    merge_sections(raw, flags=flags)
    explicit = _set_overrides(raw, overrides)
    asked = {k.split(".", 1)[1] for k in explicit if k.startswith("sampler.")}  # by an override, or the TOML
    asked |= set(toml_sampler) if isinstance(toml_sampler, Mapping) else set()
    sampler_given |= asked
    kind = raw["sampler"].get("sampler", base.sampler.sampler.value)
    if kind != base.sampler.sampler.value:  # another sampler starts from its own defaults (as on the CLI), not ddim's
        given = {k: v for k, v in raw["sampler"].items() if k in sampler_given and k != "sampler"}
        raw["sampler"] = to_dict(SamplerConfig.default_for(kind, **given))
    # The network is built for the data: image size and channels come from the data section unless
    # model.* says otherwise (then RunConfig's consistency check reports a clash).
    latent = raw.get("latent") or {}
    if latent.get("channels"):  # a latent run: the network sees latents, not pixels (see LatentConfig)
        smp = raw["sampler"]
        if smp.get("sampler") == SamplerKind.DDIM.value and smp.get("eta") == 1 and "steps" not in asked:
            smp["steps"] = LATENT_DDIM_STEPS  # measured best for latent runs (see LATENT_DDIM_STEPS)
        down = latent.get("downsample") or 1
        size = raw["data"]["image_size"] // down if isinstance(raw["data"]["image_size"], int) else raw["data"]["image_size"]
        if "model.in_channels" not in explicit:
            raw["model"]["in_channels"] = latent["channels"]
        if "loss.sigma_data" not in explicit:
            raw["loss"]["sigma_data"] = 1.0
        explicit.add("model.in_channels")
    else:
        size = raw["data"]["image_size"]
    if "model.image_size" not in explicit:
        _check_image_size(size, raw["model"], name)
        raw["model"] = _resize_model(raw["model"], size)
    if "model.in_channels" not in explicit:
        if raw["data"].get("channels"):
            raw["model"]["in_channels"] = raw["data"]["channels"]
        elif raw["data"]["source"] == "fashion-mnist":
            raw["model"]["in_channels"] = 1
    seg = raw.get("segment") or {}
    classes = seg.get("classes") if isinstance(seg, Mapping) else None
    num_classes = len(classes) if isinstance(classes, (list, tuple)) else 0
    segmenting = num_classes > 0
    if segmenting and "model.in_channels" not in explicit:  # a segmentation run denoises the K-channel one-hot mask
        raw["model"]["in_channels"] = num_classes
    if segmenting and "loss.prediction" not in named | explicit:  # masks learn far faster predicting v (SegmentConfig)
        raw["loss"]["prediction"] = SEGMENT_PREDICTION.value
    if "model.cond_channels" not in explicit:  # a super-resolution run sees the upsampled image beside x,
        up = raw.get("upscale") or {}  # a segmentation run the RGB image it segments
        raw["model"]["cond_channels"] = raw["model"]["in_channels"] if up.get("from_size") else 3 if segmenting else 0
    return from_dict(RunConfig, raw)


def _set_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any]) -> set[str]:
    """Write ``key=value`` settings into the raw config dict, each parsed and checked for its field's
    type; returns the keys set."""
    keys = set()
    for key, value in _items(overrides):
        path = key.split(".")
        new = to_dict(_parse(_leaf_type(RunConfig, path, key), value, key))  # checks the path before it is walked
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = new
        keys.add(key)
    return keys


def _check_sections(raw: dict) -> None:
    """The raw config after the TOML file is merged in, checked before :func:`resolve_config` derives
    the network from it: each section a table of known options, each option of its field's type
    (ConfigError naming it). :func:`from_dict` checks the values and the nested tables later."""
    hints = _hints(RunConfig)
    for section, values in raw.items():
        tp, where = hints.get(section), f"config.{section}"
        if tp is None:
            continue  # from_dict names unknown sections
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            _coerce(tp, values, where)
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where} must be a table of options, got {values!r}")
        names, types = [f.name for f in dataclasses.fields(tp)], _hints(tp)
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"unknown option {where}.{_shown(str(key))}; valid: {', '.join(names)}")
            if not dataclasses.is_dataclass(types[key]):
                _coerce(types[key], value, f"{where}.{key}")


def _check_image_size(size: Any, model: dict, preset: str) -> None:
    """The network halves the image once per level after the first: name the flag, not the field."""
    mults = model.get("channel_mults") or ()
    factor = 2 ** (len(mults) - 1)
    if isinstance(size, int) and not isinstance(size, bool) and size % factor:
        raise ConfigError(f"--image-size {size}: must be a multiple of {factor} for this preset "
                          f"({preset}: {len(mults)} levels, model.channel_mults={','.join(map(str, mults))})")


def condition_model(cfg: RunConfig, schema: LabelSchema | None, text_dim: int = 0) -> RunConfig:
    """``cfg`` conditioned on ``schema``'s labels: the names go to ``cond``, the sizes to the network
    (``model.label_sizes``), or with ``cond.captions`` a text input of ``text_dim`` (and cross-attention at
    the two lowest resolutions for ``cond.text_mode`` tokens/both). None leaves the model unconditional."""
    if schema is None:
        return dataclasses.replace(cfg, cond=dataclasses.replace(cfg.cond, attributes=(), classes=(), captions=False))
    cond = dataclasses.replace(cfg.cond, attributes=schema.attributes, classes=schema.classes)
    if cond.captions:
        cross = cfg.model.resolutions[-2:] if cond.text_mode is not TextMode.POOLED else ()
        model = dataclasses.replace(cfg.model, num_classes=0, label_sizes=(), text_dim=text_dim,
                                    cross_attention_resolutions=cross)
    else:
        model = dataclasses.replace(cfg.model, num_classes=0, label_sizes=schema.sizes, text_dim=0,
                                    cross_attention_resolutions=())
    return dataclasses.replace(cfg, cond=cond, model=model)


def _resize_model(model: dict, size: int) -> dict:
    """The model dict at another image size, with attention kept at the same levels (a preset
    names attention by feature-map size, which moves with the image size)."""
    old = model["image_size"]
    if old == size or old < 1 or size < 1:  # nothing to move, or a size that from_dict refuses
        return model
    def remap(resolutions):  # sizes < 1 are kept for UNetConfig to refuse
        return [size // (old // r) if r >= 1 else r for r in resolutions if r < 1 or old % r == 0]
    return {
        **model,
        "image_size": size,
        "attention_resolutions": remap(model["attention_resolutions"]),
        "linear_attention_resolutions": remap(model["linear_attention_resolutions"]),
    }


def merge_sections(raw: dict, toml: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None,
                   skip: tuple[str, ...] = ()) -> dict:
    """``raw`` (a config as a dict) with a TOML file's tables merged in (keys in ``skip`` left out) and then
    the flags' dotted keys set (``{"train.lr": 1e-3}``; None = not given): the middle of every family's
    resolution order (defaults < preset < TOML < flags < overrides)."""
    for section, values in (toml or {}).items():
        if section in skip:
            continue
        if isinstance(values, Mapping) and isinstance(raw.get(section), dict):
            raw[section] = _merge(raw[section], values)
        else:
            raw[section] = values
    for key, value in (flags or {}).items():
        if value is not None:
            sec, leaf = key.split(".", 1)
            raw[sec][leaf] = value
    return raw


def _merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out
