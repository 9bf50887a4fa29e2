"""Networks only (no diffusion math): the DDPM UNet, its config and presets."""
from difflab.models.unet import PRESETS, BlockType, NormType, UNet, UNetConfig, unet_config

__all__ = ["BlockType", "NormType", "PRESETS", "UNet", "UNetConfig", "unet_config"]
