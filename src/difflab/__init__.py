"""difflab: train, sample, evaluate and visualise image diffusion models."""
from difflab.denoiser import Denoiser
from difflab.models.presets import unet_config
from difflab.models.unet import UNet, UNetConfig
from difflab.parametrization import LossConfig, Prediction
from difflab.runs import load_run
from difflab.samplers import SamplerConfig, sample
from difflab.schedule import NoiseSchedule, ScheduleConfig

__all__ = [
    "Denoiser", "LossConfig", "NoiseSchedule", "Prediction", "SamplerConfig", "ScheduleConfig", "UNet", "UNetConfig",
    "load_run", "sample", "unet_config",
]
__version__ = "0.1.0"
