"""Networks made elsewhere and imported into a difflab run (``difflab import``): which kind, its
configuration, and :func:`build_network`, the one place that turns a run's config into its network.

A run's ``config.json`` says in its ``foreign`` table which network it holds; absent (``null``, every
trained run), the network is difflab's own :class:`~difflab.models.unet.UNet` built from ``model``. With a
``foreign`` table, the network is built from that table alone, and ``model`` records only the image size
and channels every command reads (``model.image_size``, ``model.in_channels``; :meth:`ForeignNetwork.
shape_model` writes it, and the run config checks that the two agree). The weights are in the run's
safetensors files, as for any run.

| ``foreign.kind``     | network                                       | table with its configuration |
| -------------------- | --------------------------------------------- | ---------------------------- |
| ``diffusers-unet2d`` | diffusers' own ``UNet2DModel`` (optional extra) | ``diffusers``                |
| ``ddpm-pytorch``     | denoising-diffusion-pytorch's ``Unet``, rebuilt in difflab | ``ddpm_pytorch``  |
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from torch import nn

from difflab.errors import ConfigError, parse_choice
from difflab.models.ddpm_pytorch_unet import DDPMPytorchUnet, DDPMPytorchUnetConfig
from difflab.models.diffusers_unet import DiffusersUNet, DiffusersUNet2DConfig
from difflab.models.unet import UNet, UNetConfig

if TYPE_CHECKING:  # the run config imports this module
    from difflab.config import RunConfig


class ForeignKind(str, Enum):
    """Where an imported network comes from."""

    DIFFUSERS_UNET2D = "diffusers-unet2d"  #: a diffusers ``UNet2DModel`` (``save_pretrained`` folder)
    DDPM_PYTORCH = "ddpm-pytorch"  #: the ``Unet`` of lucidrains' denoising-diffusion-pytorch (``model-N.pt``)


@dataclass(frozen=True)
class ForeignNetwork:
    """An imported network: its ``kind``, the configuration table of that kind (the other one stays empty),
    and ``source``, the file or folder it was imported from (a record only)."""

    kind: ForeignKind
    diffusers: DiffusersUNet2DConfig | None = None
    ddpm_pytorch: DDPMPytorchUnetConfig | None = None
    image_size: int = 0  # ddpm-pytorch: the image size it was trained at (a diffusers config has its own sample_size)
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_choice(ForeignKind, self.kind, "foreign.kind"))
        want = "diffusers" if self.kind is ForeignKind.DIFFUSERS_UNET2D else "ddpm_pytorch"
        other = "ddpm_pytorch" if want == "diffusers" else "diffusers"
        if getattr(self, want) is None or getattr(self, other) is not None:
            raise ConfigError(f"foreign.kind={self.kind.value} needs the table foreign.{want} and no foreign.{other}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 0:
            raise ConfigError(f"foreign.image_size must be a non-negative integer, got {self.image_size!r}")
        if self.ddpm_pytorch is not None:
            f = self.ddpm_pytorch.downsample_factor
            if self.image_size < 1 or self.image_size % f:
                raise ConfigError(f"foreign.image_size={self.image_size}: a denoising-diffusion-pytorch Unet with "
                                  f"{self.ddpm_pytorch.levels} levels needs an image size divisible by {f}")
        elif self.image_size not in (0, self.resolution):
            raise ConfigError(f"foreign.image_size={self.image_size} differs from the diffusers sample_size={self.resolution}")

    @property
    def resolution(self) -> int:
        """The square image size the network makes."""
        if self.diffusers is not None:
            return self.diffusers.sample_size
        return self.image_size

    @property
    def channels(self) -> int:
        if self.diffusers is not None:
            return self.diffusers.in_channels
        assert self.ddpm_pytorch is not None
        return self.ddpm_pytorch.channels

    @property
    def label(self) -> str:
        """A name for messages: 'diffusers UNet2DModel' or 'denoising-diffusion-pytorch Unet'."""
        return "diffusers UNet2DModel" if self.kind is ForeignKind.DIFFUSERS_UNET2D else "denoising-diffusion-pytorch Unet"

    def shape_model(self) -> UNetConfig:
        """The ``model`` table of a run holding this network: difflab's UNet fields at their defaults, except
        the image size and channels, which every command reads from there. One level and no attention, so
        that any image size is a valid UNetConfig."""
        return UNetConfig(image_size=self.resolution, in_channels=self.channels, channel_mults=(1,), attention_resolutions=())

    def build(self) -> nn.Module:
        """The network, freshly initialised (load the run's weights into it)."""
        if self.diffusers is not None:
            return DiffusersUNet(self.diffusers)
        assert self.ddpm_pytorch is not None
        return DDPMPytorchUnet(self.ddpm_pytorch)


def build_network(cfg: RunConfig) -> nn.Module:
    """The network of a run config: the imported one of ``cfg.foreign``, else difflab's UNet of ``cfg.model``."""
    return UNet(cfg.model) if cfg.foreign is None else cfg.foreign.build()


__all__ = ["ForeignKind", "ForeignNetwork", "build_network"]
