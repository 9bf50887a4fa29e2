"""The ``Unet`` of lucidrains' denoising-diffusion-pytorch (2.x), rebuilt in difflab so that its
checkpoints (the ``Trainer``'s ``model-N.pt``) run without the library and its torchvision dependency.

The module tree and parameter names are those of the library's ``Unet``, so its state dict loads as it is;
the forward pass computes the same function, checked against the library in ``tests/test_interop.py``
(one forward pass within 1e-5 in fp32, denoising-diffusion-pytorch 2.3.4). The architecture:

- time: the sinusoidal embedding of ``t`` with ``dim`` features (frequencies ``theta ** (-i / (dim/2 - 1))``,
  sines then cosines), then ``Linear -> GELU -> Linear`` to ``4 dim``;
- ``init_conv``: a 7x7 conv to ``init_dim`` (default ``dim``) channels, whose output is also kept for the end;
- each level ``dim_in -> dim_out`` (channels ``init_dim, dim * dim_mults...``) of the encoder: two residual
  blocks at ``dim_in`` (each output kept as a skip), attention, then a space-to-depth downsample
  (2x2 pixels to channels, 1x1 conv) or, at the last level, a 3x3 conv to ``dim_out``;
- middle: residual block, full attention, residual block;
- decoder, levels reversed: two residual blocks, each on the running features concatenated with one skip,
  attention, then a nearest-neighbour upsample + 3x3 conv (or a 3x3 conv at the last level);
- end: concatenation with the ``init_conv`` output, a residual block, a 1x1 conv to the image channels.

A residual block is ``conv3x3 -> RMSNorm -> x (1 + scale) + shift -> SiLU`` (scale and shift from ``SiLU ->
Linear`` of the time embedding), then ``conv3x3 -> RMSNorm -> SiLU``, plus the input (a 1x1 conv where the
channels change). RMSNorm divides each pixel's channel vector by its L2 norm and multiplies it by a
learned gain and sqrt(channels). Attention (with a residual connection around it) is softmax attention
over the pixels where ``full_attn`` says so (default: only the last level) and linear attention elsewhere
(queries softmax-normalised over features, keys over pixels; output ``1x1 conv -> RMSNorm``); both have
4 learned memory key/value pairs per head prepended to the keys and values, RMSNorm in front, and
``attn_heads`` heads of ``attn_dim_head`` channels, per level when given as lists.

Self-conditioning, learned variances and learned or random Fourier time features are not rebuilt (the
import refuses them in one line): difflab's samplers call a network with ``(x_t, t)`` only and read one
prediction of the image's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import ConfigError, DifflabError

_WHERE = "denoising-diffusion-pytorch Unet"
NUM_MEM_KV = 4  # the library's fixed number of memory key/value pairs per attention head


def _per_level(name: str, value: Any, levels: int, kind: type) -> tuple:
    """An int/bool, or a list of one per level (the library's ``cast_tuple``), as a tuple of ``levels`` items; a
    list of one item stands for every level."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(items) == 1:
        items *= levels
    if len(items) != levels:
        raise ConfigError(f"{_WHERE}: {name} has {len(items)} entries for {levels} levels (dim_mults)")
    for item in items:
        if kind is int and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
            raise ConfigError(f"{_WHERE}: {name} must hold integers >= 1, got {value!r}")
        if kind is bool and not isinstance(item, bool):
            raise ConfigError(f"{_WHERE}: {name} must hold true/false values, got {value!r}")
    return items


@dataclass(frozen=True)
class DDPMPytorchUnetConfig:
    """The arguments of denoising-diffusion-pytorch's ``Unet`` that shape the network (the library's names and
    defaults, version 2.3.4; ``dim`` has no default there). ``init_dim`` 0 means ``dim``; ``attn_heads``,
    ``attn_dim_head`` and ``full_attn`` are normalised to one entry per level (``full_attn`` empty means the
    library's default: full attention at the last level only)."""

    dim: int = 64
    init_dim: int = 0
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    dropout: float = 0.0
    attn_dim_head: tuple[int, ...] = (32,)
    attn_heads: tuple[int, ...] = (4,)
    full_attn: tuple[bool, ...] = ()
    sinusoidal_pos_emb_theta: float = 10000.0
    flash_attn: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name, minimum in (("dim", 2), ("init_dim", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{_WHERE}: {name} must be an integer >= {minimum}, got {value!r}")
        if self.dim % 2:
            raise ConfigError(f"{_WHERE}: dim must be even (its sinusoidal time embedding has dim features), got {self.dim}")
        mults = self.dim_mults
        if isinstance(mults, (str, bytes)) or not isinstance(mults, (list, tuple)) or not mults:
            raise ConfigError(f"{_WHERE}: dim_mults must be a non-empty list of integers, got {mults!r}")
        levels = len(mults)
        set_(self, "dim_mults", _per_level("dim_mults", mults, levels, int))
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError(f"{_WHERE}: channels={self.channels!r} is not supported: difflab works on 1- or 3-channel images")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"{_WHERE}: dropout must be a number in [0, 1), got {self.dropout!r}")
        set_(self, "dropout", float(self.dropout))
        set_(self, "attn_dim_head", _per_level("attn_dim_head", self.attn_dim_head, levels, int))
        set_(self, "attn_heads", _per_level("attn_heads", self.attn_heads, levels, int))
        full = self.full_attn if self.full_attn else (False,) * (levels - 1) + (True,)
        set_(self, "full_attn", _per_level("full_attn", full, levels, bool))
        theta = self.sinusoidal_pos_emb_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
            raise ConfigError(f"{_WHERE}: sinusoidal_pos_emb_theta must be a number > 1, got {theta!r}")
        set_(self, "sinusoidal_pos_emb_theta", float(theta))
        if not isinstance(self.flash_attn, bool):
            raise ConfigError(f"{_WHERE}: flash_attn must be true or false, got {self.flash_attn!r}")

    @property
    def levels(self) -> int:
        return len(self.dim_mults)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.levels - 1)


class SinusoidalTime(nn.Module):
    """``t (B,) -> (B, dim)``: sines then cosines of ``t`` times ``theta ** (-i / (dim/2 - 1))``, computed
    in the library's order of operations (so the embedding is the same to the last bit)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = math.log(self.theta) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * -step)
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class RMSNorm(nn.Module):
    """Each pixel's channel vector divided by its L2 norm, times a learned gain ``g`` and sqrt(channels)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.g * self.scale


class ConvNormAct(nn.Module):
    """``conv3x3 -> RMSNorm -> (x (1 + scale) + shift) -> SiLU -> dropout`` (the library's ``Block``)."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = RMSNorm(cout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            h = h * (scale + 1) + shift
        return self.dropout(F.silu(h))


class ResidualBlock(nn.Module):
    """Two :class:`ConvNormAct`, the first modulated by the time embedding, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, time_dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * cout))
        self.block1 = ConvNormAct(cin, cout, dropout)
        self.block2 = ConvNormAct(cout, cout)
        self.res_conv = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, (scale, shift))) + self.res_conv(x)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, heads * d, H, W) -> (B, heads, d, H * W)``."""
    b, c, h, w = t.shape
    return t.reshape(b, heads, c // heads, h * w)


class FullAttention(nn.Module):
    """Softmax attention over the pixels with memory key/values; the caller adds the residual."""

    def __init__(self, channels: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, hidden = heads, heads * dim_head
        self.norm = RMSNorm(channels)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, NUM_MEM_KV, dim_head))
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (_heads(part, self.heads).transpose(-1, -2) for part in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        mem_k, mem_v = (m.to(q.dtype).expand(b, -1, -1, -1) for m in self.mem_kv)
        k, v = torch.cat([mem_k, k], dim=-2), torch.cat([mem_v, v], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class LinearAttentionBlock(nn.Module):
    """Linear attention with memory key/values: queries softmax-normalised over their features (and scaled
    by d^-1/2), keys over the pixels; output ``1x1 conv -> RMSNorm``; the caller adds the residual."""

    def __init__(self, channels: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, hidden = heads, heads * dim_head
        self.scale = dim_head**-0.5
        self.norm = RMSNorm(channels)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, NUM_MEM_KV))
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, channels, 1), RMSNorm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (_heads(part, self.heads) for part in self.to_qkv(self.norm(x)).chunk(3, dim=1))  # (B, h, d, N)
        mem_k, mem_v = (m.to(q.dtype).expand(b, -1, -1, -1) for m in self.mem_kv)
        k, v = torch.cat([mem_k, k], dim=-1), torch.cat([mem_v, v], dim=-1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


def _parts(stage: nn.Module) -> tuple[nn.Module, ...]:
    """The four layers of one level (a ModuleList, as in the library, so that the parameter names match)."""
    assert isinstance(stage, nn.ModuleList)
    return tuple(stage)


class DDPMPytorchUnet(nn.Module):
    """denoising-diffusion-pytorch's ``Unet`` (see the module docstring): ``forward(x, t) -> prediction`` with
    ``t`` the training timestep (0 .. T-1, fractions allowed), a scalar or shape ``(B,)``."""

    def __init__(self, config: DDPMPytorchUnetConfig):
        super().__init__()
        if not isinstance(config, DDPMPytorchUnetConfig):
            raise ConfigError(f"DDPMPytorchUnet needs a DDPMPytorchUnetConfig, got {type(config).__name__}")
        self.config = c = config
        init_dim = c.init_dim or c.dim
        time_dim = 4 * c.dim
        dims = [init_dim, *(c.dim * m for m in c.dim_mults)]
        pairs = list(zip(dims[:-1], dims[1:]))
        last = len(pairs) - 1

        def attention(channels: int, level: int) -> nn.Module:
            kind = FullAttention if c.full_attn[level] else LinearAttentionBlock
            return kind(channels, c.attn_heads[level], c.attn_dim_head[level])

        def block(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, time_dim, c.dropout)

        self.init_conv = nn.Conv2d(c.channels, init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(SinusoidalTime(c.dim, c.sinusoidal_pos_emb_theta), nn.Linear(c.dim, time_dim),
                                      nn.GELU(), nn.Linear(time_dim, time_dim))
        self.downs = nn.ModuleList()
        for level, (cin, cout) in enumerate(pairs):
            down = (nn.Conv2d(cin, cout, 3, padding=1) if level == last
                    else nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * cin, cout, 1)))
            self.downs.append(nn.ModuleList([block(cin, cin), block(cin, cin), attention(cin, level), down]))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = FullAttention(mid, c.attn_heads[-1], c.attn_dim_head[-1])
        self.mid_block2 = block(mid, mid)
        self.ups = nn.ModuleList()
        for i, level in enumerate(reversed(range(len(pairs)))):
            cin, cout = pairs[level]
            up = (nn.Conv2d(cout, cin, 3, padding=1) if i == last
                  else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cout, cin, 3, padding=1)))
            self.ups.append(nn.ModuleList([block(cout + cin, cout), block(cout + cin, cout), attention(cout, level), up]))
        self.final_res_block = block(2 * init_dim, init_dim)
        self.final_conv = nn.Conv2d(init_dim, c.channels, 1)

    def forward(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        if cond:
            raise DifflabError(f"{_WHERE}: the imported model is unconditional; got {', '.join(sorted(cond))}")
        c = self.config
        f = c.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.channels or x.shape[2] % f or x.shape[3] % f:
            raise DifflabError(f"{_WHERE}: x must have shape (B, {c.channels}, H, W) with H and W divisible by {f}, "
                               f"got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(t.float())
        h = self.init_conv(x)
        first = h
        skips = []
        for stage in self.downs:
            block1, block2, attn, down = _parts(stage)
            h = block1(h, emb)
            skips.append(h)
            h = block2(h, emb)
            h = attn(h) + h
            skips.append(h)
            h = down(h)
        h = self.mid_block1(h, emb)
        h = self.mid_block2(self.mid_attn(h) + h, emb)
        for stage in self.ups:
            block1, block2, attn, up = _parts(stage)
            h = block1(torch.cat([h, skips.pop()], dim=1), emb)
            h = block2(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(attn(h) + h)
        h = self.final_res_block(torch.cat([h, first], dim=1), emb)
        out: torch.Tensor = self.final_conv(h)
        return out.to(x.dtype)


__all__ = ["DDPMPytorchUnet", "DDPMPytorchUnetConfig"]
