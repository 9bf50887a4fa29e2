"""Load a trained run directory for sampling: config.json + ema/model safetensors.

``load_run(path)`` gives a :class:`LoadedRun`: its config, network (EMA weights by default), schedule
and step; ``LoadedRun.denoiser()`` is the network as a sampler's denoiser on the fast path::

    from difflab import load_run, sample
    run = load_run("runs/faces")
    images = sample(run.denoiser(), 16, run.image_shape, run.config.sampler)   # floats in [-1, 1]
    images = run.to_pixels(images)   # a latent run's latents decoded (pixel-space runs: unchanged)
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from difflab.config import RunConfig
from difflab.denoiser import Clip, Denoiser
from difflab.errors import CheckpointError, ConfigError, parse_choice
from difflab.latent import LatentCodec, load_codec
from difflab.models.foreign import build_network
from difflab.parametrization import LossConfig, Prediction
from difflab.precision import Precision, autocast_dtype, require_compiler, to_memory_format
from difflab.schedule import NoiseSchedule
from difflab.train.checkpoint import CONFIG, latest_checkpoint, load_weights, require_run


class Weights(str, Enum):
    """Which weights of a run to load."""

    EMA = "ema"  # the exponential moving average: what to sample from
    MODEL = "model"  # the raw weights of the last step


def sampling_denoiser(model: torch.nn.Module, schedule: NoiseSchedule, objective: LossConfig | Prediction | str, *,
                      clip: Clip | str = Clip.CLIP, precision: Precision | str = Precision.AUTO, compile: bool = False,
                      guidance: float = 1.0, guidance_interval: tuple[float, float] | None = None) -> Denoiser:
    """Any trained network as a denoiser on the sampling fast path (see :meth:`LoadedRun.denoiser`):
    bf16 autocast where the hardware does bf16 natively (``precision`` auto), channels_last, and
    optionally ``torch.compile``."""
    precision = parse_choice(Precision, precision, "--precision")
    device = next(model.parameters()).device
    network: Callable[..., torch.Tensor] = model
    if compile:
        require_compiler(device, "--compile")
        network = torch.compile(model)
    return Denoiser(network, schedule, objective, clip=clip, autocast=autocast_dtype(precision, device), channels_last=True,
                    guidance=guidance, guidance_interval=guidance_interval)


@dataclass
class LoadedRun:
    path: Path
    config: RunConfig
    model: torch.nn.Module  # difflab's UNet, or an imported network (config.foreign)
    schedule: NoiseSchedule
    step: int
    codec: LatentCodec | None = None  # a latent run's frozen autoencoder (difflab.latent); None = pixel space

    def clip_mode(self, clip: Clip | str | None = None) -> Clip:
        """``clip``, or the run's default for None: ``clip`` for a pixel-space run, ``none`` for a latent run
        (latents have no [-1, 1] range; asking to clip them is one line)."""
        if clip is None:
            return Clip.NONE if self.codec is not None else Clip.CLIP
        mode = parse_choice(Clip, clip, "--clip")
        if self.codec is not None and mode is not Clip.NONE:
            raise ConfigError(f"--clip {mode.value}: run {self.path} is a latent run, and latents have no [-1, 1] range "
                              "to clip to (its images are clipped after decoding)")
        return mode

    def to_pixels(self, x: torch.Tensor, precision: Precision | str = Precision.AUTO) -> torch.Tensor:
        """Sampler output as images in [-1, 1]: a latent run's latents are decoded (in bf16 where
        ``precision`` auto finds it fast, like the network), a pixel-space run's output is returned as is."""
        if self.codec is None:
            return x
        return self._codec_in(precision).decode(x)

    def to_latents(self, x: torch.Tensor, precision: Precision | str = Precision.AUTO, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) as what the network denoises: a latent run encodes them (the
        posterior mean, normalised like its training data, ``batch_size`` at a time, on the run's device;
        returned on the CPU), a pixel-space run returns them as they are. The inverse of :meth:`to_pixels`
        up to the autoencoder's reconstruction error."""
        if self.codec is None:
            return x
        codec = self._codec_in(precision)
        return torch.cat([codec.encode(x[s : s + batch_size]).cpu() for s in range(0, len(x), batch_size)])

    def _codec_in(self, precision: Precision | str) -> LatentCodec:
        """The codec, set to run in ``precision`` (bf16 where auto finds it fast, like the network)."""
        assert self.codec is not None
        self.codec.autocast = autocast_dtype(parse_choice(Precision, precision, "--precision"), self.codec.device)
        return self.codec

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the run makes (after decoding, for a latent run)."""
        if self.codec is None:
            return self.image_shape
        return (3, self.codec.image_size, self.codec.image_size)

    def denoiser(self, clip: Clip | str | None = None, precision: Precision | str = Precision.AUTO,
                 compile: bool = False, guidance: float = 1.0,
                 guidance_interval: tuple[float, float] | None = None) -> Denoiser:
        """The run's network as a denoiser; x0_hat is clipped to the data range [-1, 1] by default
        (as in DDPM and improved-diffusion), which keeps undertrained models from saturating; a latent
        run's default is no clipping (see :meth:`clip_mode`).
        ``precision`` auto runs the network in bf16 autocast where the hardware does bf16 natively
        (2.5x the images/s of fp32 for the 'small' preset on this project's CPU); fp32 forces fp32.
        ``compile`` wraps the network in ``torch.compile`` (the first batches pay the compilation).
        ``guidance`` is the classifier-free guidance weight (see :class:`Denoiser`)."""
        return sampling_denoiser(self.model, self.schedule, self.config.loss, clip=self.clip_mode(clip), precision=precision,
                                 compile=compile, guidance=guidance, guidance_interval=guidance_interval)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (``load_run(device=...)``)."""
        return next(self.model.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the network denoises: images, or a latent run's latents."""
        m = self.config.model
        return (m.in_channels, m.image_size, m.image_size)


def load_run(run_dir: str | os.PathLike[str], *, weights: Weights | str = Weights.EMA,
             device: str | torch.device = "cpu") -> LoadedRun:
    """The run's network with its EMA (default) or raw weights from the latest checkpoint, in eval mode."""
    weights = parse_choice(Weights, weights, "--weights")
    run = require_run(run_dir)
    refuse_gan_run(run, f"sample it with `difflab gan sample --run {run}` (and `difflab gan interpolate`)")
    cfg = RunConfig.load(run / CONFIG)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"--run {run_dir}: no checkpoint has been saved yet")
    model = build_network(cfg)
    load_weights(model, ckpt.tensors(weights.value), ckpt.path / f"{weights.value}.safetensors", run / CONFIG)
    model = to_memory_format(model.to(device)).eval().requires_grad_(False)
    codec = load_codec(run, cfg.latent, device=device) if cfg.latent.active else None
    return LoadedRun(path=run, config=cfg, model=model, schedule=NoiseSchedule(cfg.schedule), step=ckpt.state["step"],
                     codec=codec)


def refuse_gan_run(run: Path, hint: str) -> None:
    """A GAN run (``difflab gan train``) has no noise schedule or denoiser: one line, with ``hint``."""
    from difflab.config import read_config_json
    from difflab.errors import ConfigError
    from difflab.gan.config import is_gan_config

    try:
        saved = read_config_json(run / CONFIG)
    except ConfigError:
        return  # RunConfig.load names the problem
    if isinstance(saved, dict) and is_gan_config(saved):
        raise CheckpointError(f"--run {run} is a GAN run: {hint}")
