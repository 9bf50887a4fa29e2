"""Building blocks of the UNet: time embedding, residual and ConvNeXt blocks, attention, resampling.

Every block that takes the time (and class) embedding is an :class:`EmbedBlock` and is called as
``block(x, emb)``, where ``emb`` is the embedding *after* its SiLU (computed once per forward pass,
as every DDPM residual block applies ``nonlinearity(temb)`` before projecting it).

Layers whose output is added to a residual stream are zero-initialised (the last conv of each block,
the attention output projections and the network's output conv), following DDPM (Ho et al. 2020,
``init_scale=0.``) and improved DDPM (Nichol & Dhariwal 2021): a fresh block is the identity, and a
fresh network outputs exactly zero.

All layers keep the batch dimension independent (GroupNorm and LayerNorm normalise each example on its
own), use no float64, and work on ``channels_last`` tensors and under ``torch.autocast``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn


def zero_init(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``(B,) -> (B, dim)``, float32.

    The DDPM form (Ho et al. 2020, ``get_timestep_embedding``; after Vaswani et al. 2017):
    ``[sin(t * f_0), ..., sin(t * f_{h-1}), cos(t * f_0), ..., cos(t * f_{h-1})]`` with ``h = dim // 2``
    and ``f_i = max_period ** (-i / (h - 1))``, so the frequencies run from 1 down to ``1/max_period``.
    An odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class NormType(Enum):
    """The normalisation layer in front of every block, attention layer and the output conv."""

    #: GroupNorm (Wu & He 2018), as in DDPM: statistics over each group of channels and all pixels
    GROUP = "group"
    #: LayerNorm over the channels of each pixel (:class:`ChannelLayerNorm`; ConvNeXt, DiT, EDM2's pixel
    #: norm): torch's native layer_norm kernel over contiguous rows of channels_last tensors, as fast as
    #: GroupNorm with 16 channels per group, but it trained worse (FID +13-17 at equal steps on anime
    #: faces, BENCHMARKS.md "Norm layers")
    LAYER = "layer"


Norm = Callable[[int], nn.Module]  # channels -> normalisation layer


def make_norm(kind: NormType, groups: int, group_channels: int = 0) -> Norm:
    """The factory ``channels -> layer`` for a :class:`NormType`.

    GroupNorm has ``groups`` groups in every layer (DDPM: 32), or, when ``group_channels > 0``,
    ``channels // group_channels`` groups of ``group_channels`` channels each (the "channels per group"
    form of Wu & He 2018). torch's CPU GroupNorm kernel for channels_last tensors is fast only when a
    group spans at least 16 channels (one AVX-512 vector of fp32): at 4 channels per group its forward
    + backward is ~3x slower (BENCHMARKS.md, "Norm layers").
    """
    if kind is NormType.GROUP:
        if group_channels:
            return lambda channels: nn.GroupNorm(channels // group_channels, channels)
        return lambda channels: nn.GroupNorm(groups, channels)
    if kind is NormType.LAYER:
        return ChannelLayerNorm
    raise ValueError(f"unknown norm {kind!r}")


class EmbedBlock(nn.Module):
    """A block whose forward is ``forward(x, emb)``: it uses the time (and class) embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# what cross-attention attends to: token embeddings (B, L, D) and their mask (B, L), True = a real token
Context = tuple[torch.Tensor, torch.Tensor]


class ContextBlock(nn.Module):
    """A block whose forward is ``forward(x, context)``: it attends to a context (text tokens)."""

    def forward(self, x: torch.Tensor, context: Context | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """Sequential that hands ``emb`` to the :class:`EmbedBlock` layers, the context to the
    :class:`ContextBlock` layers and only ``x`` to the others."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Context | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, EmbedBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(EmbedBlock):
    """The DDPM residual block (Ho et al. 2020, ``resnet_block``; after Zagoruyko & Komodakis 2016).

    ``norm -> SiLU -> conv3x3``, plus a linear projection of the embedding added per channel,
    then ``norm -> SiLU -> dropout -> conv3x3`` (zero-initialised); ``norm`` is GroupNorm in DDPM. The
    skip path is the identity, or a 1x1 conv when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, norm: Norm):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel of a ``(B, C, H, W)`` tensor (as in ConvNeXt)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A permute to (B, H, W, C) is free for channels_last tensors.
        h = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return h.permute(0, 3, 1, 2)


class ConvNeXtBlock(EmbedBlock):
    """A ConvNeXt block (Liu et al. 2022, "A ConvNet for the 2020s") with a time embedding.

    ``depthwise conv7x7 -> (+ embedding) -> LayerNorm -> conv1x1 (x4 channels) -> GELU -> dropout ->
    conv1x1`` (zero-initialised, which plays the role of ConvNeXt's layer scale). The embedding is
    projected and added right after the depthwise conv, as in the diffusion ConvNeXt block of
    lucidrains/denoising-diffusion-pytorch, so that the block's MLP sees the time. The skip path is the
    identity, or a 1x1 conv when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, expansion: int = 4):
        super().__init__()
        self.dwconv = nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels)
        self.emb_proj = nn.Linear(emb_dim, in_channels)
        self.norm = ChannelLayerNorm(in_channels)
        self.pw1 = nn.Conv2d(in_channels, expansion * out_channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.pw2 = zero_init(nn.Conv2d(expansion * out_channels, out_channels, 1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x) + self.emb_proj(emb)[:, :, None, None]
        h = self.pw2(self.dropout(F.gelu(self.pw1(self.norm(h)))))
        return self.skip(x) + h


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, H*W, C)``; a free view for channels_last tensors."""
    return x.flatten(2).transpose(1, 2)


def _to_image(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H*W, C) -> (B, C, H, W)``, a view in channels_last memory layout."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, height, width)


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention over the pixels, with a residual connection.

    The DDPM ``attn_block`` (Ho et al. 2020; Vaswani et al. 2017): ``norm`` (GroupNorm), q/k/v and output
    projections that are 1x1 convs (written as ``nn.Linear`` on the pixel tokens: the same map and the
    same parameter count), the output projection zero-initialised. Runs through
    :func:`torch.nn.functional.scaled_dot_product_attention`. ``channels // head_channels`` heads;
    ``head_channels == channels`` gives DDPM's single head.
    """

    def __init__(self, channels: int, head_channels: int, norm: Norm):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = _to_tokens(self.norm(x))
        n = tokens.shape[1]
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return x + _to_image(out, height, width)


class LinearAttention(nn.Module):
    """Linear-complexity attention for high resolutions, with a residual connection.

    Kernelised attention in the sense of Katharopoulos et al. 2020 ("Transformers are RNNs"), in the
    "efficient attention" form of Shen et al. 2021 used by lucidrains/denoising-diffusion-pytorch:
    queries are softmax-normalised over their features, keys over the pixels, and
    ``out_n = sum_d q_nd * (sum_m k_md v_m)``, which costs O(N d^2) instead of O(N^2 d) for N pixels.
    ``norm`` (GroupNorm) before, zero-initialised output projection; ``channels // head_channels`` heads.
    """

    def __init__(self, channels: int, head_channels: int, norm: Norm):
        super().__init__()
        self.heads = channels // head_channels
        self.scale = head_channels ** -0.5
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = _to_tokens(self.norm(x))
        n = tokens.shape[1]
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)  # (B, N, h, d)
        q = q.softmax(dim=-1) * self.scale  # over features
        k = k.softmax(dim=1)  # over pixels
        context = torch.einsum("bnhd,bnhe->bhde", k, v)
        out = torch.einsum("bnhd,bhde->bnhe", q, context).reshape(b, n, c)
        return x + _to_image(self.proj(out), height, width)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (DDPM ``downsample`` with ``with_conv=True``).

    Padded by one pixel on every side; TensorFlow's ``SAME`` padding in the DDPM code pads only the
    bottom and right. The parameters are the same.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 conv (DDPM ``upsample``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(ContextBlock):
    """Multi-head softmax attention from the pixels to a context of text-token embeddings, with a
    residual connection (the cross-attention of latent diffusion, Rombach et al. 2022).

    Queries come from ``norm(x)``, keys and values from ``LayerNorm(context)``; the output projection is
    zero-initialised. One learned null token is always part of the context, so an example without text
    (all of its mask False, as for the unconditional half of classifier-free guidance) attends to it
    instead of to nothing. ``context=None`` means no text for the whole batch.
    """

    def __init__(self, channels: int, context_dim: int, head_channels: int, norm: Norm):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = norm(channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: Context | None) -> torch.Tensor:
        b, c, height, width = x.shape
        if context is None:
            tokens = x.new_zeros(b, 0, self.null.shape[-1])
            mask = torch.zeros(b, 0, dtype=torch.bool, device=x.device)
        else:
            tokens, mask = context
        tokens = torch.cat([self.null.to(tokens.dtype).expand(b, -1, -1), tokens], dim=1)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        d = c // self.heads
        q = self.q(_to_tokens(self.norm(x))).reshape(b, -1, self.heads, d).transpose(1, 2)
        k, v = self.kv(self.context_norm(tokens)).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :])
        out = self.proj(out.transpose(1, 2).reshape(b, height * width, c))
        return x + _to_image(out, height, width)

