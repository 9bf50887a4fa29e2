"""Images from a GAN run: :func:`load_gan` and :func:`sample_batches` (one seed per image, so an image
does not depend on the batch size or the batch it lands in) and :func:`interpolation_strip`.

    from difflab.gan.sample import load_gan, generate
    gan = load_gan("runs/gan")
    images = generate(gan, range(16), seed=0, truncation=0.7)   # floats, about [-1, 1]

StyleGAN: one network call per image; truncation psi pulls w toward its running mean (psi < 1: less
variety, fewer failures). DDGAN: exactly T calls (T = the run's ``schedule.timesteps``); psi does not
apply. ``load_gan(..., precision=...)``: the generator calls under bf16 autocast where the hardware
does bf16 natively (``auto``, the default) or in fp32; DDGAN's posterior steps always in fp32.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.config import read_config_json
from difflab.devices import resolve_device
from difflab.errors import CheckpointError, ConfigError, parse_choice
from difflab.gan import ddgan
from difflab.gan.config import GANConfig, GANKind, is_gan_config
from difflab.gan.stylegan import Discriminator, StyleGenerator
from difflab.precision import Precision, autocast_context, autocast_dtype
from difflab.samplers.noise import image_generators
from difflab.schedule import NoiseSchedule
from difflab.train.checkpoint import CONFIG, latest_checkpoint, load_weights, require_run

# What ``difflab gan sample`` and ``load_gan`` run the generator in by default: bf16 autocast where the
# hardware does bf16 natively, as ``difflab sample`` runs the diffusion network. Measured on the ladder's
# 60-minute GANs (BENCHMARKS.md, "The boss at 60 CPU-minutes"; same 1000 seeds): FID 176.9 -> 176.8
# (StyleGAN), 285.7 -> 286.0 (DDGAN, T = 4), for 1.4x / 1.2x the images per second on this CPU.
SAMPLING_PRECISION = Precision.AUTO


def build_networks(cfg: GANConfig) -> tuple[nn.Module, Discriminator]:
    """The generator and discriminator ``cfg`` describes, freshly initialised (from torch's global RNG)."""
    c, s = cfg.data.channels, cfg.data.image_size
    if cfg.kind is GANKind.STYLEGAN:
        return StyleGenerator(cfg.net, s, c), Discriminator(cfg.net, s, c)
    return ddgan.DDGANGenerator(cfg.net, s, c, cfg.steps), Discriminator(cfg.net, s, 2 * c, t_dim=cfg.net.w_dim)


def check_truncation(cfg: GANConfig, psi: float) -> None:
    if cfg.kind is GANKind.DDGAN and psi != 1:
        raise ConfigError("--truncation is for StyleGAN runs; a DDGAN run has no w space to truncate in")
    if not 0 <= psi <= 2:
        raise ConfigError(f"--truncation must be in [0, 2] (1 = none, 0.7 typical), got {psi}")


@dataclass
class LoadedGAN:
    path: Path
    config: GANConfig
    generator: nn.Module
    schedule: NoiseSchedule | None
    step: int
    autocast: torch.dtype | None = None  # the generator's autocast dtype; None: fp32

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_shape


def read_gan_config(run_dir: str | os.PathLike[str], flag: str = "--run") -> GANConfig:
    run = require_run(run_dir, flag)
    raw = read_config_json(run / CONFIG)
    if not isinstance(raw, dict) or not is_gan_config(raw):
        raise CheckpointError(f"{flag} {run_dir} is a diffusion run, not a GAN run (difflab train and difflab sample "
                              "handle those)")
    return GANConfig.from_dict(raw)


def load_gan(run_dir: str | os.PathLike[str], weights: str = "ema", device: str | torch.device | None = None,
             precision: Precision | str = SAMPLING_PRECISION) -> LoadedGAN:
    """The run's generator (``ema`` weights by default, or ``model``, the raw ones) at its latest checkpoint,
    run in ``precision`` (auto by default: the generator calls under bf16 autocast where the hardware does
    bf16 natively, else fp32; DDGAN's posterior steps stay fp32)."""
    if weights not in ("ema", "model"):
        raise ConfigError(f"--weights must be ema or model, got {weights!r}")
    precision = parse_choice(Precision, precision, "--precision")
    dev = resolve_device(device)
    cfg = read_gan_config(run_dir)
    run = Path(run_dir)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"--run {run_dir} has no checkpoint yet")
    with torch.random.fork_rng(devices=[]):
        gen, _ = build_networks(cfg)
    load_weights(gen, ckpt.tensors(weights), ckpt.path / f"{weights}.safetensors", run / CONFIG)
    gen = gen.to(dev).eval().requires_grad_(False)
    schedule = NoiseSchedule(cfg.schedule) if cfg.kind is GANKind.DDGAN else None
    return LoadedGAN(run, cfg, gen, schedule, int(ckpt.state["step"]), autocast_dtype(precision, dev))


def latents(gen: nn.Module, cfg: GANConfig, gens: list[torch.Generator], device: torch.device) -> dict[str, Tensor]:
    """Every random draw of the images ``gens`` stand for, image by image."""
    if cfg.kind is GANKind.STYLEGAN:
        assert isinstance(gen, StyleGenerator)
        return gen.draw_latents(gens, device)
    return ddgan.draw_latents(gens, cfg.image_shape, cfg.net.z_dim, cfg.steps, device)


def autocast_call(fn: Callable[..., Tensor], device: torch.device, autocast: torch.dtype | None) -> Callable[..., Tensor]:
    """``fn`` run under ``autocast`` (None: fp32), its output back in float32."""
    def call(*args: Any, **kwargs: Any) -> Tensor:
        with autocast_context(device, autocast):
            return fn(*args, **kwargs).float()
    return call


@torch.no_grad()
def render(gen: nn.Module, cfg: GANConfig, lat: dict[str, Tensor], truncation: float = 1.0,
           autocast: torch.dtype | None = None) -> Tensor:
    """The images of the latents ``lat`` (float32); the generator calls run under ``autocast`` (None:
    fp32), DDGAN's posterior steps in fp32."""
    call = autocast_call(gen, next(gen.parameters()).device, autocast)
    if cfg.kind is GANKind.STYLEGAN:
        return call(psi=truncation, **lat)
    return ddgan.render(call, NoiseSchedule(cfg.schedule), lat)


def generate(gan: LoadedGAN | tuple[nn.Module, GANConfig], indices: range | list[int], *, seed: int = 0,
             truncation: float = 1.0) -> Tensor:
    """Images ``indices`` of the sample set ``seed`` (floats, about [-1, 1]), on the generator's device."""
    gen, cfg, dtype = (gan.generator, gan.config, gan.autocast) if isinstance(gan, LoadedGAN) else (*gan, None)
    device = next(gen.parameters()).device
    return render(gen, cfg, latents(gen, cfg, image_generators(seed, list(indices)), device), truncation, dtype)


def sample_batches(gan: LoadedGAN, n: int, *, seed: int = 0, batch_size: int = 64, start: int = 0,
                   truncation: float = 1.0, progress: bool = True) -> Iterator[tuple[range, Tensor]]:
    """Images start .. start + n - 1 in batches: (their indices, floats in [-1, 1] on the CPU)."""
    check_truncation(gan.config, truncation)
    with tqdm(total=n, desc="sampling", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for lo in range(start, start + n, batch_size):
            idx = range(lo, min(lo + batch_size, start + n))
            imgs = generate(gan, idx, seed=seed, truncation=truncation).clamp(-1, 1).cpu()
            bar.update(len(idx))
            yield idx, imgs


@torch.no_grad()
def interpolation_strip(gan: LoadedGAN, *, seed: int = 0, rows: int = 4, frames: int = 8, truncation: float = 1.0) -> Tensor:
    """``rows`` interpolations of ``frames`` images each (rows * frames images, row by row): row r goes
    from image 2r to image 2r + 1 of the sample set ``seed``. StyleGAN: linear in w (noise of the first
    image); DDGAN: spherical in every Gaussian latent (x_{T-1} and the z of every step; posterior noise
    of the first image)."""
    check_truncation(gan.config, truncation)
    gen, cfg, device = gan.generator, gan.config, gan.device
    fracs = [k / max(frames - 1, 1) for k in range(frames)]
    out = []
    for r in range(rows):
        lat = latents(gen, cfg, image_generators(seed, [2 * r, 2 * r + 1]), device)
        first = {k: v[:1].expand(frames, *v.shape[1:]) for k, v in lat.items()}
        if cfg.kind is GANKind.STYLEGAN:
            assert isinstance(gen, StyleGenerator)
            ws = gen.ws(lat["z"], psi=truncation)
            w = torch.stack([ws[0].lerp(ws[1], f) for f in fracs])
            synthesis = autocast_call(gen.synthesis, device, gan.autocast)
            out.append(synthesis(w, [first[f"noise{i}"] for i in range(len(gen.noise_res))]))
        else:
            moved = {k: torch.cat([ddgan.slerp(v[:1], v[1:], f) for f in fracs]) for k, v in lat.items() if k != "eps"}
            out.append(render(gen, cfg, {**first, **moved}, autocast=gan.autocast))
    return torch.cat(out).clamp(-1, 1).cpu()
