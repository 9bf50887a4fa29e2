"""Run directories and checkpoints: safetensors for tensors, JSON for everything else, no pickle.

Layout of a run directory::

    config.json                 the resolved RunConfig (rebuilds network, schedule, training)
    model.safetensors           latest raw weights   } hard links to the newest checkpoint's files,
    ema.safetensors             latest EMA weights   } replaced atomically
    checkpoints/step-0001000/   one complete checkpoint per save, the last K kept:
        model.safetensors  ema.safetensors  optimizer.safetensors  state.json
    latest.json                 {"checkpoint": "checkpoints/step-0001000"}, replaced atomically
    log.jsonl                   metrics, one JSON object per line
    samples/                    periodic sample grids

A checkpoint is written into ``step-N.tmp-*`` and renamed to ``step-N`` only once every file in it
is complete and fsync'ed; ``latest.json`` is switched after that. A crash at any point leaves the
previous checkpoint, and ``latest.json`` pointing to it, intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflab.errors import CheckpointError
from difflab.io import atomic_path, atomic_write_json, fsync_dir

CONFIG = "config.json"
LATEST = "latest.json"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is damaged: {e}") from None


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / f"{name}.safetensors")


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``tensors`` (name -> state dict) and ``state`` as checkpoint ``step``; keep the last ``keep``."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=ckpt_root))
    try:
        for name, sd in tensors.items():
            save_tensors(sd, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        _fsync_file(tmp / "state.json")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(run_dir / LATEST, {"checkpoint": f"checkpoints/{final.name}", "step": step})
    for name in ("model", "ema"):
        if name in tensors:
            _link_latest(final / f"{name}.safetensors", run_dir / f"{name}.safetensors")
    _prune(ckpt_root, keep, final)
    return final


def _link_latest(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src`` atomically: a hard link (no copy) where possible, else a copy."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _prune(ckpt_root: Path, keep: int, newest: Path) -> None:
    done = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name)
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob("*.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint ``latest.json`` names, or None for a run with no checkpoint yet."""
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    try:
        rel = json.loads(pointer.read_text())["checkpoint"]
        path = run_dir / rel
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"run {run_dir}: latest checkpoint is unreadable ({e})") from None
    return Checkpoint(path=path, state=state)


def require_run(run_dir: str | os.PathLike[str], flag: str = "--run") -> Path:
    """``run_dir`` as a Path, or a one-line error naming ``flag`` when it holds no run."""
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        what = "does not exist" if not run.exists() else "is a file" if not run.is_dir() else f"holds no {CONFIG}"
        raise CheckpointError(f"{flag} {run_dir}: not a difflab run directory (it {what})")
    return run


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path, config: Path) -> None:
    """``module.load_state_dict(tensors)``, or one line that says how the file and the config differ:
    how many tensors have another shape, are missing or are extra, with the first of each named."""
    own = module.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    problems = []
    if shapes:
        k, theirs, ours = shapes[0]
        problems.append(f"{len(shapes)} tensor(s) of another shape (first: {k} is {list(theirs)} in the file, "
                        f"{list(ours)} for the config)")
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} the config has no place for (first: {extra[0]})")
    if problems:
        raise CheckpointError(f"{source} does not match {config}: " + "; ".join(problems))
    module.load_state_dict(tensors)
