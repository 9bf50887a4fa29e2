"""diffusers' ``UNet2DModel`` as a difflab network: its configuration as a typed, checked record, and the
module that builds and calls it.

diffusers is an optional extra (``pip install -e '.[interop]'``); it is imported only when a network is
built (:func:`require_diffusers`), and its absence is one :class:`~difflab.errors.ConfigError` naming the
extra. The network itself is diffusers' own code: difflab stores the configuration (the keys of
``UNet2DModel``'s ``config.json``) and the weights (in the run's safetensors, under the prefix ``unet.``)
and rebuilds the same module when the run is loaded, so any block type ``UNet2DModel`` runs
unconditionally works.

What is refused here, in one line naming the setting, is what a difflab denoiser cannot call the network
with or make sense of: class embeddings (difflab passes no diffusers class labels), Fourier and learned
time embeddings (score-SDE VE models, and tables that need integer timesteps where difflab's solvers
place fractional ones), an output with other channels than the input (learned variances), and images
other than 1- or 3-channel squares (latent-space models).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.errors import ConfigError, DifflabError

#: the diffusers release these mappings were written and tested against (the ``interop`` extra pins it)
DIFFUSERS_VERSION = "0.42.1"

#: block types ``UNet2DModel`` runs with a time embedding and no other input
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D",)
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")
RESAMPLE_TYPES = ("conv", "resnet")
TIME_SCALE_SHIFTS = ("default", "scale_shift")

_WHERE = "diffusers UNet2DModel"


def require_diffusers() -> Any:
    """The ``diffusers`` module, or one ConfigError naming the extra that brings it."""
    try:
        import diffusers
    except ImportError as e:
        raise ConfigError(f"this needs diffusers, which is not installed ({e}): pip install -e '.[interop]' "
                          f"(diffusers=={DIFFUSERS_VERSION})") from None
    return diffusers


def _block_name(name: str) -> str:
    return name[7:] if name.startswith("UNetRes") else name  # diffusers accepts both spellings


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_WHERE}: {name} must be an integer >= {minimum}, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_WHERE}: {name}={value!r} is not supported (difflab runs {', '.join(allowed)})")


@dataclass(frozen=True)
class DiffusersUNet2DConfig:
    """The configuration of a diffusers ``UNet2DModel``: its ``config.json`` keys (diffusers 0.42), with
    their defaults, checked when built. ``sample_size`` is one integer (square images);
    :meth:`unet_kwargs` gives the keyword arguments of ``UNet2DModel``."""

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{_WHERE}: {name} must be a list, got {value!r}")
            set_(self, name, tuple(value))
        _int("sample_size", self.sample_size, 1)
        if self.in_channels not in (1, 3) or isinstance(self.in_channels, bool):
            raise ConfigError(f"{_WHERE}: in_channels={self.in_channels!r} is not supported: difflab works on 1- or "
                              "3-channel images (a latent-space model needs its autoencoder)")
        if self.out_channels != self.in_channels:
            raise ConfigError(f"{_WHERE}: out_channels={self.out_channels!r} differs from in_channels={self.in_channels} "
                              "(a learned-variance model): difflab reads the output as one prediction of the image's shape")
        if self.time_embedding_type != "positional":
            raise ConfigError(f"{_WHERE}: time_embedding_type={self.time_embedding_type!r} is not supported (only "
                              "'positional': a 'fourier' model is a score-SDE VE model, a 'learned' one takes only integer "
                              "timesteps)")
        if self.class_embed_type is not None or self.num_class_embeds is not None:
            what = (f"class_embed_type={self.class_embed_type!r}" if self.class_embed_type is not None
                    else f"num_class_embeds={self.num_class_embeds!r}")
            raise ConfigError(f"{_WHERE}: {what} (a class-conditional model) is not supported: difflab imports "
                              "unconditional UNet2DModels")
        for value in self.block_out_channels:
            _int("block_out_channels", value, 1)
        levels = len(self.block_out_channels)
        if not levels or len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ConfigError(f"{_WHERE}: down_block_types, up_block_types and block_out_channels need the same number "
                              f"of entries, got {len(self.down_block_types)}, {len(self.up_block_types)} and {levels}")
        for name in self.down_block_types:
            _choice("down_block_types", _block_name(name), DOWN_BLOCKS)
        for name in self.up_block_types:
            _choice("up_block_types", _block_name(name), UP_BLOCKS)
        if self.mid_block_type is not None:
            _choice("mid_block_type", self.mid_block_type, MID_BLOCKS)
        factor = 2 ** (levels - 1)
        if self.sample_size % factor:
            raise ConfigError(f"{_WHERE}: sample_size={self.sample_size} must be divisible by {factor} "
                              f"({levels} levels)")
        _int("layers_per_block", self.layers_per_block, 1)
        _int("downsample_padding", self.downsample_padding, 0)
        _int("freq_shift", self.freq_shift, 0)
        for name in ("time_embedding_dim", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups",
                     "num_train_timesteps"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
        _choice("downsample_type", self.downsample_type, RESAMPLE_TYPES)
        _choice("upsample_type", self.upsample_type, RESAMPLE_TYPES)
        _choice("act_fn", self.act_fn, ACTIVATIONS)
        _choice("resnet_time_scale_shift", self.resnet_time_scale_shift, TIME_SCALE_SHIFTS)
        for name in ("mid_block_scale_factor", "dropout", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{_WHERE}: {name} must be a number >= 0, got {value!r}")
            set_(self, name, float(value))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{_WHERE}: dropout must be in [0, 1), got {self.dropout}")
        for name in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_WHERE}: {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def image_size(self) -> int:
        return self.sample_size

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``diffusers.UNet2DModel`` (lists where diffusers' config has lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` called the difflab way: ``forward(x, t) -> prediction`` with ``t`` the
    (possibly fractional) training timestep, a scalar or shape ``(B,)``. Its weights are ``unet.*``: the
    diffusers state dict under the prefix ``unet``."""

    def __init__(self, config: DiffusersUNet2DConfig):
        super().__init__()
        if not isinstance(config, DiffusersUNet2DConfig):
            raise ConfigError(f"DiffusersUNet needs a DiffusersUNet2DConfig, got {type(config).__name__}")
        self.config = config
        unet_class = require_diffusers().UNet2DModel
        try:
            self.unet = unet_class(**config.unet_kwargs())
        except (ValueError, TypeError, KeyError) as e:  # a combination diffusers itself refuses
            raise ConfigError(f"{_WHERE}: diffusers cannot build this configuration: {str(e).splitlines()[0]}") from None

    def forward(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        if cond:
            raise DifflabError(f"{_WHERE}: the imported model is unconditional; got {', '.join(sorted(cond))}")
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise DifflabError(f"{_WHERE}: x must have shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out: torch.Tensor = self.unet(x, t, return_dict=False)[0]
        return out.to(x.dtype)


__all__ = ["DIFFUSERS_VERSION", "DiffusersUNet", "DiffusersUNet2DConfig", "require_diffusers"]
