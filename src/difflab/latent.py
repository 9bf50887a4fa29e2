"""Latent diffusion's two ends (Rombach et al. 2022): the frozen autoencoder of a latent run
(:class:`difflab.config.LatentConfig`) as a :class:`LatentCodec` that turns images into the
unit-variance latents the UNet learns, and sampled latents back into images.

    difflab train-autoencoder --data faces/ --image-size 64 --out runs/ae       # difflab.autoencoder
    difflab train --latent-of runs/ae --data faces/ --out runs/ldm               # the UNet on latents
    difflab sample --run runs/ldm -n 1000 --out submission/                      # decoded: 64 px images

The diffusion side does not know about pixels: the denoiser, every sampler, guidance and the
conditions see latents. Three places do: training data (:func:`encode_images`: the data set is
encoded once, with the posterior mean, and cached like decoded images are, both orientations when
``data.augment.hflip`` is on), previews and ``difflab sample`` (:meth:`LatentCodec.decode`).
When training starts the autoencoder's EMA weights and config are copied into ``RUN/autoencoder/``
(:func:`freeze`), so a latent run keeps sampling when the autoencoder run moves on or is deleted.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.config import LatentConfig
from difflab.data.dataset import to_float
from difflab.errors import CheckpointError, ConfigError, OutputError
from difflab.io import atomic_path, atomic_write_bytes, cache_dir
from difflab.precision import autocast_context

AE_DIR = "autoencoder"  # inside a latent run: the frozen autoencoder (config.json, ema.safetensors, report.json)
CACHE_FORMAT = 1  # bump when encoding changes, so old cached latents are not reused


@dataclass
class LatentCodec:
    """A frozen autoencoder with the latent statistics of its run: ``encode`` gives normalised latents
    ``(mean_z - mean) / std``, ``decode`` inverts that and decodes to images in [-1, 1]. ``autocast``:
    the dtype the networks run in (bf16 where the hardware has it), or None for fp32."""

    model: Any  # difflab.autoencoder.model.Autoencoder, eval mode, no gradients
    config: Any  # difflab.autoencoder.config.AutoencoderConfig
    mean: Tensor  # (C,) float32
    std: Tensor  # (C,) float32
    autocast: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return (self.mean.to(like.device)[None, :, None, None], self.std.to(like.device)[None, :, None, None])

    def _autocast(self) -> Any:
        return autocast_context(self.device, self.autocast)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> normalised latents (N, C, h, w), float32 (the posterior mean)."""
        with self._autocast():
            mean, _ = self.model.encode(x.to(self.device))
        m, s = self._stats(mean)
        return (mean.float() - m) / s

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], float32."""
        m, s = self._stats(z)
        with self._autocast():
            x = self.model.decode((z.float() * s + m).to(self.device))
        return x.float().clamp(-1, 1)

    def weights_digest(self) -> str:
        """sha256 of the autoencoder's weights and config: part of the cache key of encoded data."""
        h = hashlib.sha256(self.config.to_json().encode())
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _stats_tensors(lat: LatentConfig) -> tuple[Tensor, Tensor]:
    return torch.tensor(lat.mean, dtype=torch.float32), torch.tensor(lat.std, dtype=torch.float32)


def latent_settings(ae_run: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``latent.*`` and ``data.*`` settings of a run trained on ``ae_run``'s latents (``difflab
    train --latent-of``): the statistics come from the report the autoencoder run writes when its
    training ends, which must describe its newest checkpoint. One line for anything else."""
    from difflab.autoencoder import load_autoencoder

    model, cfg, report = load_autoencoder(ae_run, device="cpu")
    step = _checkpoint_step(ae_run)
    if not report:
        raise ConfigError(f"--latent-of {ae_run}: no report.json (the latent statistics are measured when "
                          "difflab train-autoencoder finishes; let it finish, or --resume it)")
    if report.get("step") != step:
        raise ConfigError(f"--latent-of {ae_run}: report.json describes step {report.get('step')} but the newest "
                          f"checkpoint is step {step} (finish the autoencoder's training, or --resume it, to measure again)")
    return {
        "latent.autoencoder": str(Path(ae_run).expanduser().resolve()), "latent.step": step,
        "latent.channels": int(cfg.net.latent_channels), "latent.downsample": int(cfg.net.downsample),
        "latent.mean": [float(v) for v in report["latent_mean"]], "latent.std": [float(v) for v in report["latent_std"]],
        "data.image_size": int(cfg.data.image_size), "data.channels": 3,
    }


def _checkpoint_step(run: str | os.PathLike[str]) -> int:
    from difflab.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(run).expanduser())
    if ckpt is None:
        raise CheckpointError(f"--latent-of {run}: the autoencoder run has no checkpoint yet")
    return int(ckpt.state["step"])


def codec_from_run(lat: LatentConfig, *, device: str | torch.device = "cpu",
                   autocast: torch.dtype | None = None) -> LatentCodec:
    """The codec of a latent run about to start: the autoencoder run ``lat.autoencoder`` at the step the
    run's config recorded (one line when that run has moved on)."""
    from difflab.autoencoder import load_autoencoder

    step = _checkpoint_step(lat.autoencoder)
    if step != lat.step:
        raise ConfigError(f"--latent-of {lat.autoencoder}: its newest checkpoint is step {step}, the config was made "
                          f"at step {lat.step}; resolve the config again (drop --config / the saved latent.* values)")
    model, cfg, _ = load_autoencoder(lat.autoencoder, device=device)
    return LatentCodec(model, cfg, *_stats_tensors(lat), autocast=autocast)


def freeze(codec: LatentCodec, run_dir: str | os.PathLike[str], source: str | os.PathLike[str] | None = None) -> Path:
    """Copy the codec's autoencoder (config and EMA weights, and the ``source`` run's report.json) into
    ``run_dir/autoencoder/``, each file written atomically; returns that folder."""
    from safetensors.torch import save_file

    folder = Path(run_dir) / AE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "ema.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in codec.model.state_dict().items()}, str(tmp))
    report = Path(source).expanduser() / "report.json" if source else None
    if report is not None and report.is_file():
        atomic_write_bytes(folder / "report.json", report.read_bytes())
    atomic_write_bytes(folder / "config.json", codec.config.to_json().encode())  # last: marks the copy complete
    return folder


def load_codec(run_dir: str | os.PathLike[str], lat: LatentConfig, *, device: str | torch.device = "cpu",
               autocast: torch.dtype | None = None) -> LatentCodec:
    """The frozen autoencoder a latent run carries (``RUN/autoencoder/``)."""
    from difflab.autoencoder import Autoencoder, AutoencoderConfig
    from difflab.train.checkpoint import load_tensors, load_weights

    folder = Path(run_dir) / AE_DIR
    if not (folder / "config.json").is_file() or not (folder / "ema.safetensors").is_file():
        raise CheckpointError(f"{run_dir} is a latent run but {folder} lacks its autoencoder (config.json, "
                              "ema.safetensors); train it again with --latent-of")
    cfg = AutoencoderConfig.load(folder / "config.json")
    model = Autoencoder(cfg.net)
    load_weights(model, load_tensors(folder / "ema.safetensors", "autoencoder weights"), folder / "ema.safetensors",
                 folder / "config.json")
    if (int(cfg.net.latent_channels), int(cfg.net.downsample)) != (lat.channels, lat.downsample):
        raise CheckpointError(f"{folder}: the autoencoder makes {cfg.net.latent_channels}-channel latents at 1/"
                              f"{cfg.net.downsample} but the run's config says {lat.channels} at 1/{lat.downsample}")
    model = model.to(device).eval().requires_grad_(False)
    return LatentCodec(model, cfg, *_stats_tensors(lat), autocast=autocast)


def encode_images(codec: LatentCodec, images: Tensor, *, hflip: bool, batch_size: int = 256,
                  progress: bool = True, use_cache: bool = True) -> Tensor:
    """The normalised latents of uint8 images (N, 3, H, W): (N, V, C, h, w) float32, V = 2 with
    ``hflip`` (the latents of each image and of its mirror image: a latent's flip is not the flipped
    image's latent) and 1 without. Cached in ``difflab.io.cache_dir("latents")`` under a hash of the
    images, the autoencoder's weights and config, the statistics, the precision and the views."""
    from safetensors.torch import load_file, save_file

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"a latent run encodes 3-channel images; got {tuple(images.shape)} {images.dtype}")
    if images.shape[-1] != codec.image_size:
        raise ConfigError(f"the autoencoder takes {codec.image_size} px images, the data has {images.shape[-1]} px")
    views = 2 if hflip else 1
    h = hashlib.sha256(f"{CACHE_FORMAT}|{views}|{codec.autocast}|{codec.weights_digest()}|".encode())
    h.update(codec.mean.numpy().tobytes() + codec.std.numpy().tobytes())
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    path = cache_dir("latents") / f"{h.hexdigest()[:32]}.safetensors"
    if use_cache and path.is_file():
        try:
            return load_file(str(path))["latents"]
        except Exception:  # noqa: BLE001 - a damaged cache file (any reader error) is encoded again and replaced
            pass
    out: Tensor | None = None
    bar = tqdm(total=len(images) * views, desc="encoding latents", unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(images), batch_size):
        x = to_float(images[s : s + batch_size])
        parts = [codec.encode(x)] + ([codec.encode(x.flip(-1))] if hflip else [])
        z = torch.stack(parts, 1).cpu()
        if out is None:
            out = torch.empty((len(images), *z.shape[1:]), dtype=torch.float32)
        out[s : s + len(z)] = z
        bar.update(len(x) * views)
    bar.close()
    assert out is not None  # images is not empty (the loader refuses an empty folder)
    if use_cache:
        try:
            with atomic_path(path) as tmp:
                save_file({"latents": out}, str(tmp))
        except (OSError, OutputError):  # a full or read-only cache disk must not stop training
            pass
    return out
