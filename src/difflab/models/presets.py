"""Named UNet sizes: :data:`PRESETS` and :func:`unet_config` (a preset with some fields replaced)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from difflab.errors import ConfigError
from difflab.models.unet import UNetConfig


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
