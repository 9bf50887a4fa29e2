"""Loading a trained autoencoder run (for latent diffusion, or to measure it): its config, its weights
at the newest checkpoint (EMA by default) and its ``report.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from difflab.autoencoder.config import AutoencoderConfig, is_autoencoder_config
from difflab.autoencoder.model import Autoencoder
from difflab.autoencoder.trainer import REPORT, build_autoencoder
from difflab.config import read_config_json
from difflab.devices import resolve_device
from difflab.errors import CheckpointError
from difflab.train.checkpoint import CONFIG, latest_checkpoint, load_weights, require_run


def read_autoencoder_config(run_dir: str | os.PathLike[str], flag: str = "--run") -> AutoencoderConfig:
    """The config of the autoencoder run ``run_dir``, or one line naming ``flag`` when it is another kind of run."""
    run = require_run(run_dir, flag)
    raw = read_config_json(run / CONFIG)
    if not isinstance(raw, dict) or not is_autoencoder_config(raw):
        family = raw.get("family", "diffusion") if isinstance(raw, dict) else "unknown"
        raise CheckpointError(f"{flag} {run_dir} is a {family} run, not an autoencoder run (difflab train-autoencoder "
                              "makes those)")
    return AutoencoderConfig.from_dict(raw)


def read_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's report.json (latent statistics, held-out PSNR / FID), or {} when it has none yet."""
    path = Path(run_dir) / REPORT
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    if not isinstance(report, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return report


def load_autoencoder(run_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu", use_ema: bool = True,
                     flag: str = "--run") -> tuple[Autoencoder, AutoencoderConfig, dict[str, Any]]:
    """(autoencoder in eval mode without gradients, its config, its report.json or {}) of the run's
    newest checkpoint; ``use_ema`` picks the EMA weights (default) or the raw ones."""
    cfg = read_autoencoder_config(run_dir, flag)
    run = Path(run_dir)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"{flag} {run_dir} has no checkpoint yet")
    name = "ema" if use_ema else "model"
    with torch.random.fork_rng(devices=[]):
        ae = build_autoencoder(cfg)
    load_weights(ae, ckpt.tensors(name), ckpt.path / f"{name}.safetensors", run / CONFIG)
    ae = ae.to(resolve_device(device)).eval().requires_grad_(False)
    return ae, cfg, read_report(run)
