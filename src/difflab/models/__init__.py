"""Networks only (no diffusion math): the DDPM UNet, its config and presets."""
from difflab.models.presets import PRESETS, unet_config
from difflab.models.unet import BlockType, NormType, UNet, UNetConfig

__all__ = ["BlockType", "NormType", "PRESETS", "UNet", "UNetConfig", "unet_config"]
