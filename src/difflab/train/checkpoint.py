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
previous checkpoint, and ``latest.json`` pointing to it, intact. A write that fails (disk full, no
permission, read-only file system) is one :class:`CheckpointError` naming the path; the temporary
directory is removed and the previous checkpoint stays the latest.

At least two checkpoints are kept whatever ``keep`` says, so that a checkpoint damaged after it was
written (a truncated copy, a bad disk) has a predecessor: :func:`load_newest_good` tries the newest
first and falls back, one warning per damaged checkpoint, which it renames ``step-N.damaged`` so
that pruning and later resumes leave it alone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflab.errors import CheckpointError, ConfigError, DifflabWarning, OutputError
from difflab.io import atomic_path, atomic_write_bytes, atomic_write_json, fsync_dir

CONFIG = "config.json"
LATEST = "latest.json"
MIN_KEEP = 2  # a damaged newest checkpoint always has a predecessor to fall back to
_STEP_DIR = re.compile(r"step-(\d+)")
T = TypeVar("T")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def load_tensors(path: Path, what: str = "checkpoint file") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or one CheckpointError naming it as ``what``."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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
    # safetensors stores every tensor contiguous; a moment buffer must have its parameter's layout again
    # (channels_last convolution weights), as the fused AdamW kernel walks both with the same strides
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, value in st.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


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
    """Write ``tensors`` (name -> state dict) and ``state`` as checkpoint ``step``; keep the last
    ``max(keep, 2)``. A failed write (ENOSPC, EACCES, EROFS, EFBIG, ...) raises one
    :class:`CheckpointError` naming the path, after removing what it had written."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp: Path | None = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=ckpt_root))
        for name, sd in tensors.items():
            save_tensors(sd, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        _fsync_file(tmp / "state.json")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        tmp = None
        fsync_dir(ckpt_root)
        atomic_write_json(run_dir / LATEST, {"checkpoint": f"checkpoints/{final.name}", "step": step})
        for name in ("model", "ema"):
            if name in tensors:
                _link_latest(final / f"{name}.safetensors", run_dir / f"{name}.safetensors")
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {final}: {_os_reason(e)}; "
                              f"{_previous(run_dir)} is intact") from None
    except (SafetensorError, OutputError) as e:  # safetensors' own error type; io.atomic_path's one line
        raise CheckpointError(f"could not write checkpoint {final}: {e}; {_previous(run_dir)} is intact") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(ckpt_root, keep, final)
    return final


def _os_reason(e: OSError) -> str:
    """``strerror`` and the file it concerns, e.g. 'No space left on device (.../model.safetensors)'."""
    reason = e.strerror or str(e)
    return f"{reason} ({e.filename})" if e.filename else reason


def _previous(run_dir: Path) -> str:
    try:
        rel = json.loads((run_dir / LATEST).read_text())["checkpoint"]
        return f"the previous checkpoint {run_dir / rel}"
    except (OSError, ValueError, KeyError, TypeError):
        return "the run's earlier files"


def _link_latest(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src`` atomically: a hard link (no copy) where possible, else a copy."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints (``step-N``, no temporary or damaged ones), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir())


def _prune(ckpt_root: Path, keep: int, newest: Path) -> None:
    for old in _step_dirs(ckpt_root)[:-max(keep, MIN_KEEP)]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob("*.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def _read_checkpoint(path: Path) -> Checkpoint:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: state.json is unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: state.json has no step")
    return Checkpoint(path=path, state=state)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint ``latest.json`` names, or None for a run with no checkpoint yet."""
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    try:
        rel = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"run {run_dir}: {pointer.name} is unreadable ({e})") from None
    return _read_checkpoint(run_dir / rel)


def candidate_checkpoints(run_dir: Path) -> list[Path]:
    """Where a resume looks, in order: the checkpoint ``latest.json`` names (if it exists), then every
    other complete checkpoint, newest first."""
    steps = _step_dirs(run_dir / "checkpoints")[::-1]
    try:
        named = run_dir / json.loads((run_dir / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return steps
    return [named] + [p for p in steps if p != named] if named in steps else steps


def load_newest_good(run_dir: Path, load: Callable[[Checkpoint], T], *, quarantine: bool = True) -> tuple[Checkpoint, T] | None:
    """``load`` applied to the newest checkpoint that loads: a checkpoint whose ``load`` raises
    :class:`CheckpointError` (truncated file, bad header, missing member, other shapes) or a KeyError,
    TypeError, ValueError or RuntimeError (a state that does not fit) is reported
    in one warning and the previous one is tried; once one loads, the damaged newer ones are renamed
    ``step-N.damaged`` (when ``quarantine``). None when the run has no checkpoint; a CheckpointError,
    renaming nothing, when none of them loads (a changed config, say)."""
    candidates = candidate_checkpoints(run_dir)
    damaged: list[Path] = []
    errors: list[str] = []
    for path in candidates:
        try:
            ckpt = _read_checkpoint(path)
            try:
                loaded = load(ckpt)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a state.json or tensor that does not fit
                raise CheckpointError(f"checkpoint {path} does not load: {type(e).__name__}: {e}") from None
        except CheckpointError as e:
            damaged.append(path)
            errors.append(str(e))
            if len(candidates) > len(errors):
                warnings.warn(f"{e}; falling back to the previous checkpoint", DifflabWarning, stacklevel=2)
            continue
        if quarantine:
            for bad in damaged:
                _quarantine(bad)
        return ckpt, loaded
    if errors:
        raise CheckpointError(f"run {run_dir}: none of its {len(candidates)} checkpoint(s) loads (newest: {errors[0]})")
    return None


def _quarantine(path: Path) -> None:
    """Move a damaged checkpoint out of the way (kept for inspection, never loaded or pruned)."""
    target = path.with_name(path.name + ".damaged")
    try:
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
    except OSError:
        pass


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


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds at least one complete checkpoint (what ``--resume auto`` resumes)."""
    return bool(candidate_checkpoints(Path(run_dir)))


def open_run_dir(run_dir: Path, resume: bool | Literal["auto"]) -> tuple[bool, bool]:
    """Check ``run_dir`` for a trainer about to start or continue there: (resume, restart), where
    ``resume="auto"`` means resume if it has a checkpoint, else start, also over a first attempt that
    died before its first checkpoint (restart: its config and log are replaced)."""
    restart = False
    if resume == "auto":  # one command line for the first start and every requeue
        resume, restart = has_checkpoint(run_dir), True
    elif not isinstance(resume, bool):
        raise ConfigError(f"resume must be true, false or 'auto', got {resume!r}")
    if resume:
        require_run(run_dir, "--out")
    elif run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file; give a folder for the run")
    elif (run_dir / CONFIG).exists() and not restart:
        raise CheckpointError(f"--out {run_dir} already holds a run; pass --resume (or --resume auto) or choose another --out")
    return resume, restart


def start_run_dir(run_dir: Path, config_json: str, restart: bool) -> None:
    """Create ``run_dir`` with its config; a restart drops the dead attempt's log (not this run's). A link to a
    folder still to be made (a run kept on another disk: ``runs/x -> /disk/x``) gets its folder made."""
    run_dir.resolve().mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG, config_json.encode())
    if restart:
        (run_dir / "log.jsonl").unlink(missing_ok=True)
