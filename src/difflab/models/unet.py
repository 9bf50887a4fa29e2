"""The UNet noise-prediction network of DDPM, its configuration and named presets.

Architecture (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B and the
``diffusion_tf`` code; a PixelCNN++-style UNet after Salimans et al. 2017 and Ronneberger et al. 2015):

- time embedding: sinusoidal embedding of ``t`` with ``base_channels`` features (float32), then
  ``Linear -> SiLU -> Linear`` to ``4 * base_channels`` features; with ``num_classes > 0`` a learned class
  embedding is added to it (index ``num_classes`` is the "null" label for classifier-free guidance,
  Ho & Salimans 2022);
- encoder: ``conv3x3`` to ``base_channels``, then per level ``num_res_blocks`` blocks (each followed by
  attention where the feature map size is listed) and a stride-2 conv downsample (not after the last);
- middle: block, softmax attention, block;
- decoder: per level ``num_res_blocks + 1`` blocks, each taking the concatenation of the running
  features and one stored encoder output, then a nearest-upsample + conv (not after the first level);
- output: ``GroupNorm -> SiLU -> conv3x3`` back to ``in_channels`` (zero-initialised).

GroupNorm has ``norm_groups`` groups (DDPM: 32) or, with ``norm_group_channels > 0``, groups of that
many channels: the ``small`` and ``default`` presets use 16 channels per group, which keeps torch's
channels_last GroupNorm kernel fast on CPU (1.24x per training step). ``norm="layer"`` replaces every
GroupNorm (blocks, attention, output) by a LayerNorm over the channels of each pixel (see
:class:`NormType`).

The network is convolutional: ``image_size`` fixes which levels get attention, and ``forward`` accepts
any height and width divisible by ``2 ** (len(channel_mults) - 1)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import ConfigError, DifflabError, parse_choice
from difflab.models.layers import (
    ConvNeXtBlock,
    Downsample,
    EmbedSequential,
    LinearAttention,
    NormType,
    ResBlock,
    SelfAttention,
    Upsample,
    make_norm,
    timestep_embedding,
    zero_init,
)


class BlockType(Enum):
    """The kind of block the UNet is built from."""

    RESNET = "resnet"  #: DDPM residual block (GroupNorm, SiLU, 3x3 convs)
    CONVNEXT = "convnext"  #: ConvNeXt block (depthwise 7x7, LayerNorm, inverted bottleneck, GELU)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"UNetConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"UNetConfig.{name} must be >= {minimum}, got {value}")
    return value


def _check_int_tuple(name: str, value: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ConfigError(f"UNetConfig.{name} must be a list of integers, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise ConfigError(f"UNetConfig.{name} must hold integers >= {minimum}, got {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet`. Checked when built; :func:`difflab.config.to_dict` / ``from_dict``
    round-trip it via JSON (fields missing from an old run's file take their defaults).

    Attributes:
        image_size: training image size in pixels (square). Must be divisible by
            ``2 ** (len(channel_mults) - 1)``; with ``channel_mults`` it fixes the feature-map size of each
            level (``image_size``, ``image_size / 2``, ...), which is what the two attention lists name.
        in_channels: image channels, 1 (grey) or 3 (RGB); the output has the same number.
        base_channels: channels of the first level; level ``i`` has ``base_channels * channel_mults[i]``.
            The time embedding has ``4 * base_channels`` features (as in DDPM).
        channel_mults: per-level channel multipliers; one level per entry.
        num_res_blocks: blocks per level in the encoder (the decoder has one more per level).
        attention_resolutions: feature-map sizes (pixels) after whose blocks softmax self-attention runs.
            The middle of the network always has one softmax attention layer.
        linear_attention_resolutions: feature-map sizes where linear attention (Shen et al. 2021 /
            Katharopoulos et al. 2020) runs instead: cheap enough for high resolutions.
        head_channels: channels per attention head; a layer with ``C`` channels has ``C // head_channels``
            heads, so ``head_channels`` must divide the channel count of every attended level (and of
            the middle). Set it to that channel count for a single head, as in DDPM.
        dropout: dropout probability inside each block (DDPM: 0.1 on CIFAR-10).
        block: ``"resnet"`` or ``"convnext"`` (a :class:`BlockType`).
        norm: ``"group"`` (GroupNorm, DDPM's) or ``"layer"`` (LayerNorm over each pixel's channels), a
            :class:`NormType`; ConvNeXt blocks always use their own LayerNorm inside.
        norm_groups: GroupNorm groups; must divide ``base_channels`` (and so every channel count). Used
            only when ``norm_group_channels`` is 0.
        norm_group_channels: when > 0, every GroupNorm has groups of this many channels (``C //
            norm_group_channels`` groups in a ``C``-channel layer) instead of ``norm_groups`` groups; must
            divide ``base_channels``. 16 or more keeps torch's channels_last GroupNorm kernel fast.
        num_classes: 0 for an unconditional model; ``K > 0`` adds a learned embedding of the labels
            ``0..K-1`` plus the null label ``K`` (used when ``class_labels`` is ``None``).
    """

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    linear_attention_resolutions: tuple[int, ...] = ()
    head_channels: int = 64
    dropout: float = 0.1
    block: BlockType = BlockType.RESNET
    norm: NormType = NormType.GROUP
    norm_groups: int = 32
    norm_group_channels: int = 0
    num_classes: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise in place: lists -> tuples, strings -> enums, ints -> floats
        _check_int("image_size", self.image_size, 1)
        if type(self.in_channels) is not int or self.in_channels not in (1, 3):
            raise ConfigError(f"UNetConfig.in_channels must be 1 or 3, got {self.in_channels!r}")
        _check_int("base_channels", self.base_channels, 1)
        set_(self, "channel_mults", _check_int_tuple("channel_mults", self.channel_mults, 1))
        if not self.channel_mults:
            raise ConfigError("UNetConfig.channel_mults must have at least one entry")
        _check_int("num_res_blocks", self.num_res_blocks, 1)
        set_(self, "attention_resolutions", _check_int_tuple("attention_resolutions", self.attention_resolutions, 1))
        set_(
            self,
            "linear_attention_resolutions",
            _check_int_tuple("linear_attention_resolutions", self.linear_attention_resolutions, 1),
        )
        _check_int("head_channels", self.head_channels, 1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"UNetConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        set_(self, "dropout", float(self.dropout))
        set_(self, "block", parse_choice(BlockType, self.block, "UNetConfig.block"))
        set_(self, "norm", parse_choice(NormType, self.norm, "UNetConfig.norm"))
        _check_int("norm_groups", self.norm_groups, 1)
        _check_int("norm_group_channels", self.norm_group_channels, 0)
        _check_int("num_classes", self.num_classes, 0)

        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"UNetConfig.image_size={self.image_size} must be divisible by {factor} "
                f"(2 ** (len(channel_mults) - 1) for channel_mults={self.channel_mults})"
            )
        # every channel count is a multiple of base_channels, so dividing it is enough
        divisor = "norm_group_channels" if self.norm_group_channels else "norm_groups"
        if self.norm is NormType.GROUP and self.base_channels % getattr(self, divisor):
            raise ConfigError(
                f"UNetConfig.{divisor}={getattr(self, divisor)} must divide base_channels={self.base_channels}"
            )
        sizes = self.resolutions
        for name in ("attention_resolutions", "linear_attention_resolutions"):
            for res in getattr(self, name):
                if res not in sizes:
                    raise ConfigError(
                        f"UNetConfig.{name}: {res} is not a feature-map size of this network "
                        f"(image_size={self.image_size} with {len(sizes)} levels gives {', '.join(map(str, sizes))})"
                    )
        both = sorted(set(self.attention_resolutions) & set(self.linear_attention_resolutions))
        if both:
            raise ConfigError(
                f"UNetConfig.attention_resolutions and linear_attention_resolutions both list {both}; "
                "choose one kind of attention per resolution"
            )
        attended = set(self.attention_resolutions) | set(self.linear_attention_resolutions)
        for level, (res, mult) in enumerate(zip(sizes, self.channel_mults)):
            channels = self.base_channels * mult
            is_middle = level == len(sizes) - 1
            if (res in attended or is_middle) and channels % self.head_channels:
                where = f"resolution {res}" if res in attended else "the middle attention"
                raise ConfigError(
                    f"UNetConfig.head_channels={self.head_channels} must divide the {channels} channels "
                    f"at {where}"
                )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level, from ``image_size`` down."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))


def _check_field_names(names: Any) -> None:
    valid = [f.name for f in dataclasses.fields(UNetConfig)]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ConfigError(f"unknown UNetConfig field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


PRESETS: Mapping[str, UNetConfig] = MappingProxyType(
    {
        # For tests: about 0.18 M parameters.
        "tiny": UNetConfig(
            image_size=16,
            base_channels=16,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            head_channels=16,
            norm_groups=8,
        ),
        # A fast CPU demo at 28-32 px: about 1.6 M parameters. GroupNorm with 16 channels per group, not
        # a fixed group count: 1.2x per training step on CPU at equal or better FID (BENCHMARKS.md).
        "small": UNetConfig(
            image_size=32,
            base_channels=32,
            channel_mults=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(8,),
            head_channels=32,
            norm_groups=8,
            norm_group_channels=16,
        ),
        # A sensible 32-64 px CPU model (about 14.7 M parameters); the layout of diffusers' UNet2DModel with
        # block_out_channels=(64, 128, 256), layers_per_block=2 and attention at 16x16, except for
        # GroupNorm's 16 channels per group (diffusers: 32 groups; norm_group_channels=0 restores them).
        "default": UNetConfig(
            image_size=32,
            base_channels=64,
            channel_mults=(1, 2, 4),
            num_res_blocks=2,
            attention_resolutions=(16,),
            head_channels=64,
            norm_groups=32,
            norm_group_channels=16,
        ),
        # Ho et al. 2020, CIFAR-10: 35.7 M parameters, single-head attention at 16x16.
        "ddpm-cifar10": UNetConfig(
            image_size=32,
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            head_channels=256,
            dropout=0.1,
            norm_groups=32,
        ),
    }
)


def unet_config(preset: str, **overrides: Any) -> UNetConfig:
    """The named preset from :data:`PRESETS`, with some fields replaced (and the result re-checked)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown UNet preset {preset!r}; choose one of {', '.join(map(repr, PRESETS))}")
    _check_field_names(overrides.keys())
    return dataclasses.replace(PRESETS[preset], **overrides)


class UNet(nn.Module):
    """The DDPM UNet (see the module docstring), predicting a tensor of the input's shape.

    ``forward(x, t, class_labels=None)``:

    - ``x``: ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by ``2 ** (levels - 1)``;
    - ``t``: timesteps in the model's training scale (e.g. 0..999, fractions allowed), shape ``(B,)`` or
      a scalar (Python number or 0-d tensor) used for the whole batch;
    - ``class_labels``: ``(B,)`` integer labels in ``0..num_classes`` (``num_classes`` is the null label);
      ``None`` means all null, i.e. unconditional. Only for models with ``num_classes > 0``.

    Returns a tensor of ``x``'s shape and dtype (also under autocast). Output conv, the last layer of
    each block and the attention output projections start at zero, so a fresh network outputs zeros.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ConfigError(f"UNet needs a UNetConfig, got {type(config).__name__}")
        self.config = config
        c = config
        base = c.base_channels
        emb_dim = 4 * base
        softmax_at = set(c.attention_resolutions)
        linear_at = set(c.linear_attention_resolutions)
        norm = make_norm(c.norm, c.norm_groups, c.norm_group_channels)

        def block(cin: int, cout: int) -> nn.Module:
            if c.block is BlockType.CONVNEXT:
                return ConvNeXtBlock(cin, cout, emb_dim, c.dropout)
            return ResBlock(cin, cout, emb_dim, c.dropout, norm)

        def with_attention(layers: list[nn.Module], channels: int, res: int) -> EmbedSequential:
            if res in softmax_at:
                layers.append(SelfAttention(channels, c.head_channels, norm))
            elif res in linear_at:
                layers.append(LinearAttention(channels, c.head_channels, norm))
            return EmbedSequential(*layers)

        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None

        self.conv_in = nn.Conv2d(c.in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base]
        ch = base
        last = len(c.channel_mults) - 1
        for level, (mult, res) in enumerate(zip(c.channel_mults, c.resolutions)):
            for _ in range(c.num_res_blocks):
                self.down.append(with_attention([block(ch, base * mult)], base * mult, res))
                ch = base * mult
                skip_channels.append(ch)
            if level != last:
                self.down.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle = EmbedSequential(
            block(ch, ch), SelfAttention(ch, c.head_channels, norm), block(ch, ch)
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(c.channel_mults))):
            out = base * c.channel_mults[level]
            res = c.resolutions[level]
            for i in range(c.num_res_blocks + 1):
                stage = with_attention([block(ch + skip_channels.pop(), out)], out, res)
                ch = out
                if level != 0 and i == c.num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(stage)

        self.norm_out = norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, c.in_channels, 3, padding=1))

    @property
    def null_class(self) -> int:
        """The label meaning "no class" (classifier-free guidance); ``num_classes``."""
        return self.config.num_classes

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _embedding(self, t: Any, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise DifflabError(f"UNet: t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        dtype = next(self.time_embed.parameters()).dtype
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(dtype))
        if self.class_embed is None:
            if class_labels is not None:
                raise DifflabError("UNet: class_labels given, but this model is unconditional (num_classes=0)")
            return F.silu(emb)
        if class_labels is None:
            class_labels = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        elif class_labels.shape != (batch,) or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise DifflabError(
                f"UNet: class_labels must be integers of shape ({batch},), "
                f"got {class_labels.dtype} of shape {tuple(class_labels.shape)}"
            )
        elif bool((class_labels < 0).any() | (class_labels > self.null_class).any()):
            raise DifflabError(
                f"UNet: class_labels must lie in 0..{self.null_class} ({self.null_class} is the null label)"
            )
        return F.silu(emb + self.class_embed(class_labels.to(device)))

    def forward(self, x: torch.Tensor, t: Any, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        factor = 2 ** (len(c.channel_mults) - 1)
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise DifflabError(
                f"UNet: x must have shape (B, {c.in_channels}, H, W) with H and W divisible by {factor}, "
                f"got {tuple(x.shape)}"
            )
        emb = self._embedding(t, class_labels, x.shape[0], x.device)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.to(x.dtype)


__all__ = ["BlockType", "NormType", "PRESETS", "UNet", "UNetConfig", "unet_config"]
