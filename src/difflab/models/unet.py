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

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from difflab.errors import ConfigError, DifflabError, parse_choice
from difflab.models.conditioning import ConditionEmbedding
from difflab.models.layers import (
    ConvNeXtBlock,
    CrossAttention,
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


class CondMode(str, Enum):
    """How a conditioning image (``lowres``, ``cond_channels`` > 0) enters the network."""

    CONCAT = "concat"  #: concatenated to x before ``conv_in`` (SR3, Saharia et al. 2021)
    ADD = "add"  #: its own encoder G's features added to ``conv_in(x)`` (SegDiff, Amit et al. 2021)


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
        in_channels: image channels, 1 (grey) or 3 (RGB), a latent run's latent channels, or a segmentation
            run's K classes (the one-hot mask, :mod:`difflab.edit.segment`); the output has the same number.
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
        num_classes: ``K > 0`` is a one-attribute label of K classes, the same as ``label_sizes=(K,)``
            (kept for configs written before ``label_sizes``); 0 = none.
        label_sizes: one entry per categorical attribute (e.g. ``(12, 10)`` for hair and eye colour);
            each adds a learned embedding of its labels to the time embedding, with a null entry for
            "not given" (label -1, :mod:`difflab.models.conditioning`).
        text_dim: > 0 adds a linear map of a pooled text embedding of this size to the time embedding.
        cross_attention_resolutions: feature-map sizes where a cross-attention layer attends to the text's
            token embeddings (of size ``text_dim``), after that level's blocks; needs ``text_dim > 0``.
        cond_channels: > 0 makes the network take an image of this many channels, at the input's size
            (``lowres``: the upsampled low-resolution image of a super-resolution model, as in SR3, Saharia
            et al. 2021; the image a segmentation model segments, :mod:`difflab.edit.segment`).
        cond_mode: how that image enters (a :class:`CondMode`): ``concat`` (default) concatenates it to
            the input of ``conv_in``; ``add`` runs it through its own encoder G (conv3x3 -> SiLU ->
            conv3x3, ``base_channels`` wide, at full resolution) and adds G's features to ``conv_in(x)``
            (SegDiff's F(x_t) + G(I), Amit et al. 2021). Needs ``cond_channels`` > 0.
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
    label_sizes: tuple[int, ...] = ()
    text_dim: int = 0
    cross_attention_resolutions: tuple[int, ...] = ()
    cond_channels: int = 0
    cond_mode: CondMode = CondMode.CONCAT

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise in place: lists -> tuples, strings -> enums, ints -> floats
        _check_int("image_size", self.image_size, 1)
        # images: 1 or 3 channels; a latent run (difflab.latent): the autoencoder's latent channels
        if type(self.in_channels) is not int or not 1 <= self.in_channels <= 64:
            raise ConfigError(f"UNetConfig.in_channels must be an integer in 1..64 (1 or 3 for images), got {self.in_channels!r}")
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
        set_(self, "label_sizes", _check_int_tuple("label_sizes", self.label_sizes, 1))
        if self.num_classes and self.label_sizes:
            raise ConfigError("UNetConfig: give num_classes or label_sizes, not both")
        _check_int("text_dim", self.text_dim, 0)
        set_(self, "cross_attention_resolutions",
             _check_int_tuple("cross_attention_resolutions", self.cross_attention_resolutions, 1))
        if self.cross_attention_resolutions and not self.text_dim:
            raise ConfigError("UNetConfig.cross_attention_resolutions needs text_dim > 0 (the token embedding size)")
        _check_int("cond_channels", self.cond_channels, 0)
        set_(self, "cond_mode", parse_choice(CondMode, self.cond_mode, "UNetConfig.cond_mode"))
        if self.cond_mode is CondMode.ADD and not self.cond_channels:
            raise ConfigError("UNetConfig.cond_mode=add needs cond_channels > 0 (a conditioning image to encode)")

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
        for name in ("attention_resolutions", "linear_attention_resolutions", "cross_attention_resolutions"):
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
        attended |= set(self.cross_attention_resolutions)
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
    def conditions(self) -> tuple[int, ...]:
        """The label sizes the network takes (``label_sizes``, or ``(num_classes,)``)."""
        return self.label_sizes or ((self.num_classes,) if self.num_classes else ())

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level, from ``image_size`` down."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))


class UNet(nn.Module):
    """The DDPM UNet (see the module docstring), predicting a tensor of the input's shape.

    ``forward(x, t, labels=None, text=None, text_tokens=None, text_mask=None, lowres=None)``:

    - ``x``: ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by ``2 ** (levels - 1)``;
    - ``t``: timesteps in the model's training scale (e.g. 0..999, fractions allowed), shape ``(B,)`` or
      a scalar (Python number or 0-d tensor) used for the whole batch;
    - ``labels``: ``(B, A)`` (or ``(B,)`` for one attribute) integers, -1 = not given; ``None`` = none given;
    - ``text``: ``(B, text_dim)`` pooled text embedding (all zeros = no text);
    - ``text_tokens``, ``text_mask``: ``(B, L, text_dim)`` token embeddings and ``(B, L)`` booleans for the
      cross-attention layers;
    - ``lowres``: ``(B, cond_channels, H, W)``, a conditioning image (super-resolution, segmentation),
      concatenated to ``x`` or encoded and added to ``conv_in(x)`` (``cond_mode``).
    Conditions a model does not take are an error.

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
            if res in cross_at:
                layers.append(CrossAttention(channels, c.text_dim, c.head_channels, norm))
            return EmbedSequential(*layers)

        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_embed = ConditionEmbedding(c.conditions, c.text_dim, emb_dim)
        cross_at = set(c.cross_attention_resolutions)

        concat = c.cond_channels if c.cond_mode is CondMode.CONCAT else 0
        self.conv_in = nn.Conv2d(c.in_channels + concat, base, 3, padding=1)
        # SegDiff's G: the conditioning image's own encoder, its features added to conv_in(x) (cond_mode add)
        self.cond_encoder = (nn.Sequential(nn.Conv2d(c.cond_channels, base, 3, padding=1), nn.SiLU(),
                                           nn.Conv2d(base, base, 3, padding=1))
                             if c.cond_channels and c.cond_mode is CondMode.ADD else None)
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

        middle: list[nn.Module] = [block(ch, ch), SelfAttention(ch, c.head_channels, norm)]
        if c.resolutions[-1] in cross_at:
            middle.append(CrossAttention(ch, c.text_dim, c.head_channels, norm))
        self.middle = EmbedSequential(*middle, block(ch, ch))

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

    #: recompute each level in the backward pass (``train.grad_checkpoint``); used only while training
    grad_checkpoint: bool = False

    def _run(self, stage: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: Any) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            out: torch.Tensor = torch.utils.checkpoint.checkpoint(stage, h, emb, context, use_reentrant=False)
            return out
        result: torch.Tensor = stage(h, emb, context)
        return result

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _embedding(self, t: Any, batch: int, device: torch.device, labels: torch.Tensor | None,
                   text: torch.Tensor | None) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise DifflabError(f"UNet: t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        dtype = next(self.time_embed.parameters()).dtype
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(dtype))
        cond = self.cond_embed(batch, device, labels, text)
        return F.silu(emb if cond is None else emb + cond)

    def forward(self, x: torch.Tensor, t: Any, labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                lowres: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        factor = 2 ** (len(c.channel_mults) - 1)
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise DifflabError(
                f"UNet: x must have shape (B, {c.in_channels}, H, W) with H and W divisible by {factor}, "
                f"got {tuple(x.shape)}"
            )
        emb = self._embedding(t, x.shape[0], x.device, labels, text)
        context = None
        if text_tokens is not None:
            if not c.cross_attention_resolutions:
                raise DifflabError("UNet: text_tokens given, but this model has no cross-attention")
            mask = text_mask if text_mask is not None else torch.ones(text_tokens.shape[:2], dtype=torch.bool)
            context = (text_tokens.to(x.device), mask.to(x.device))

        if c.cond_channels:
            want = (x.shape[0], c.cond_channels, *x.shape[2:])
            if lowres is None or tuple(lowres.shape) != want:
                got = "none" if lowres is None else tuple(lowres.shape)
                raise DifflabError(f"UNet: this model needs lowres of shape {want} (the conditioning image), got {got}")
            image = lowres.to(x.device, x.dtype)
            if self.cond_encoder is None:
                h = self.conv_in(torch.cat([x, image], dim=1))
            else:
                h = self.conv_in(x) + self.cond_encoder(image)
        elif lowres is not None:
            raise DifflabError("UNet: lowres given, but this model takes no conditioning image (model.cond_channels=0)")
        else:
            h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context)
            skips.append(h)
        h = self._run(self.middle, h, emb, context)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.to(x.dtype)


__all__ = ["BlockType", "CondMode", "NormType", "UNet", "UNetConfig"]
