"""Optional TensorBoard logging: the JSONL log's scalars and the preview grids, as event files.

Off by default (``train.tensorboard=true`` turns it on); ``tensorboard`` is not a dependency of
difflab, so asking for it without the package installed is a one-line error when the trainer
is built, not a failure hours into a run. Events go to ``RUN/tensorboard``; view them with
``tensorboard --logdir RUN/tensorboard``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difflab.errors import ConfigError

SUBDIR = "tensorboard"


def require_tensorboard() -> type:
    """torch's SummaryWriter, or a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer imports the tensorboard package
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        SummaryWriter = require_tensorboard()
        # on resume, purge_step drops the events a stopped run wrote after its last checkpoint (at
        # start_step), so the resumed curves do not fold back on themselves
        self.writer = SummaryWriter(log_dir=str(run_dir / SUBDIR), purge_step=start_step + 1 if start_step else None)

    def scalars(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key in ("loss", "lr", "grad_norm", "images_per_s"):
            self.writer.add_scalar(f"train/{key}", record[key], step)
        for q, value in enumerate(record["loss_quartiles"]):
            if value is not None:
                self.writer.add_scalar(f"loss_by_t_quartile/q{q + 1}", value, step)

    def grid(self, grid: torch.Tensor, step: int) -> None:
        """A uint8 (C, H, W) image grid."""
        self.writer.add_image("samples", grid, step, dataformats="CHW")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
