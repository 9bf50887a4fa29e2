"""What every import shares: the record of an imported model, reading its JSON files, and writing it as a
difflab run directory (config.json + one checkpoint whose raw and EMA weights are the imported ones)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab.config import DataConfig, RunConfig
from difflab.errors import CheckpointError, ConfigError
from difflab.models.foreign import ForeignNetwork
from difflab.parametrization import LossConfig, Prediction
from difflab.samplers import SamplerConfig
from difflab.schedule import NoiseSchedule, ScheduleConfig
from difflab.train.checkpoint import CONFIG, load_weights, save_checkpoint, start_run_dir


@dataclass
class ImportedModel:
    """A network made elsewhere, mapped onto difflab: the network (kind, configuration, source), its weights
    (the state dict of :meth:`ForeignNetwork.build`'s module), the training schedule and what the network
    predicts, the sampler that matches how the source samples, the training step it records, and notes
    for the user (settings that were mapped approximately or ignored)."""

    foreign: ForeignNetwork
    tensors: dict[str, torch.Tensor]
    schedule: ScheduleConfig
    prediction: Prediction
    sampler: SamplerConfig
    step: int = 0
    notes: list[str] = field(default_factory=list)

    def run_config(self) -> RunConfig:
        """The config.json of the run this model becomes."""
        f = self.foreign
        return RunConfig(model=f.shape_model(), schedule=self.schedule, loss=LossConfig(prediction=self.prediction),
                         data=DataConfig(source=f.source, image_size=f.resolution, channels=f.channels),
                         sampler=self.sampler, preset="", foreign=f)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or one ConfigError naming the file (``what`` says which file it should be)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a JSON file") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8 or not JSON
        raise ConfigError(f"{what} {path} is not readable JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_out(out: Path) -> None:
    """``--out`` of an import: a new folder, or an existing one that holds no run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run")
    if (out / CONFIG).exists():
        raise ConfigError(f"--out {out} already holds a run; choose another --out")


def write_imported_run(out: str | Path, model: ImportedModel) -> RunConfig:
    """Write ``model`` as the run directory ``out`` (which must not hold a run): config.json and checkpoint
    ``step-N`` with ``model`` and ``ema`` weights (both the imported ones). The weights are loaded into the
    rebuilt network first, so a configuration that does not fit them is one line naming the source and
    nothing is written."""
    out = Path(out).expanduser()
    check_out(out)
    cfg = model.run_config()
    NoiseSchedule(cfg.schedule)  # betas out of (0, 1): one line before anything is written
    network = model.foreign.build()
    source = Path(model.foreign.source)
    try:
        load_weights(network, model.tensors, source, Path(f"the {model.foreign.label} configuration"))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (check the stated architecture)") from None
    state = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in network.state_dict().items()}
    start_run_dir(out, cfg.to_json(), restart=False)
    save_checkpoint(out, model.step, {"model": state, "ema": state},
                    {"step": model.step, "imported": {"kind": model.foreign.kind.value, "source": model.foreign.source}},
                    keep=2)
    return RunConfig.load(out / CONFIG)


__all__ = ["ImportedModel", "check_out", "read_json", "write_imported_run"]
