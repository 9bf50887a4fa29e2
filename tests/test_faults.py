"""Faults a long training job meets: requeues that repeat the command line, kill -9 at any moment,
damaged checkpoints, full disks. Nothing may be lost, and a resumed run must equal an uninterrupted one."""
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.errors import CheckpointError, DifflabWarning
from difflab.runs import load_run
from difflab.train import Trainer
from difflab.train import checkpoint as ckpt_mod
from test_train import states, synthetic, tiny_cfg


def same_weights(a: Path, b: Path) -> None:
    sa, sb = states(a), states(b)
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for k in sa[name]:
            assert torch.equal(sa[name][k], sb[name][k]), (name, k)


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def straight(tmp_path):
    """An uninterrupted 8-step run (dropout on: its random stream must survive a resume) that kept
    every checkpoint: steps 3, 6 and 8."""
    cfg = tiny_cfg("train.keep_checkpoints=5")
    Trainer(cfg, tmp_path / "straight", data=synthetic(), progress=False).run()
    return cfg, tmp_path / "straight"


def copy_at(run: Path, step: int, dest: Path) -> Path:
    """``run`` as a job killed right after its periodic checkpoint ``step`` (and later steps' log lines)."""
    dest.mkdir()
    for name in ("config.json", "log.jsonl"):
        shutil.copy(run / name, dest / name)
    shutil.copytree(run / "checkpoints" / f"step-{step:07d}", dest / "checkpoints" / f"step-{step:07d}")
    (dest / "latest.json").write_text(json.dumps({"checkpoint": f"checkpoints/step-{step:07d}", "step": step}))
    return dest


def test_resume_from_a_periodic_checkpoint_is_bit_identical(straight, tmp_path):
    """The state a periodic checkpoint saves is what the next step needs (dropout's stream included):
    a job killed after it and resumed ends with the uninterrupted run's weights; the log lines the
    killed job wrote after the checkpoint are dropped, not repeated."""
    cfg, run = straight
    killed = copy_at(run, 3, tmp_path / "killed")
    Trainer(cfg, killed, data=synthetic(), progress=False, resume=True).run()
    same_weights(run, killed)
    assert steps_logged(killed) == steps_logged(run) == [2, 4, 6, 8]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_header(path: Path) -> None:
    path.write_bytes(b"\xff" * 64)


def _missing(path: Path) -> None:
    path.unlink()


def _other_shape(path: Path) -> None:
    tensors = ckpt_mod.load_tensors(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 1)
    ckpt_mod.save_tensors(tensors, path)


@pytest.mark.parametrize("damage", [_truncate, _bad_header, _missing, _other_shape])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, damage):
    cfg, run = straight
    job = tmp_path / "job"
    shutil.copytree(run, job)
    for step in (6, 8):  # a job killed at 8, whose two newest checkpoints were then damaged
        damage(job / "checkpoints" / f"step-{step:07d}" / ("model.safetensors" if step == 8 else "ema.safetensors"))
    with pytest.warns(DifflabWarning, match="step-0000008.*falling back") as caught:
        trainer = Trainer(cfg, job, data=synthetic(), progress=False, resume=True)
    assert trainer.step == 3 and len([w for w in caught if "falling back" in str(w.message)]) == 2
    assert all("\n" not in str(w.message) for w in caught)
    names = sorted(p.name for p in (job / "checkpoints").iterdir())
    assert names == ["step-0000003", "step-0000006.damaged", "step-0000008.damaged"]  # kept aside, never loaded again
    trainer.run()
    same_weights(run, job)  # from step 3 to 8 again: the same weights


def test_when_no_checkpoint_loads_resume_is_one_error_and_renames_nothing(straight, tmp_path):
    cfg, run = straight
    job = tmp_path / "job"
    shutil.copytree(run, job)
    for d in (job / "checkpoints").iterdir():
        _truncate(d / "model.safetensors")
    with pytest.warns(DifflabWarning), pytest.raises(CheckpointError, match="none of its 3 checkpoint") as err:
        Trainer(cfg, job, data=synthetic(), progress=False, resume=True)
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["step-0000003", "step-0000006", "step-0000008"]


def test_at_least_two_checkpoints_are_kept(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg("train.keep_checkpoints=1", "train.checkpoint_every=2"), run, data=synthetic(), progress=False).run()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]


def test_sample_names_the_damaged_file(straight, tmp_path, capsys):
    _, run = straight
    job = tmp_path / "job"
    shutil.copytree(run, job)
    _truncate(job / "checkpoints" / "step-0000008" / "ema.safetensors")
    assert main(["sample", "--run", str(job), "-n", "1", "--out", str(tmp_path / "imgs"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step-0000008/ema.safetensors is damaged" in err


# -- the command line a requeued job runs ---------------------------------------------------------

def image_folder(root: Path, n: int = 24, size: int = 16) -> Path:
    g = torch.Generator().manual_seed(0)
    root.mkdir()
    for k in range(n):
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"{k}.png")
    return root


TRAIN = ["--image-size", "16", "--preset", "tiny", "--batch-size", "8", "--no-progress", "train.sample_every=0",
         "train.checkpoint_every=2", "train.log_every=2", "train.precision=fp32"]


def test_resume_accepts_the_same_command_line_and_names_real_changes(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN]
    assert main([*argv, "--max-steps", "2"]) == 0
    # the same line again with --resume (the data folder named another way is the same folder)
    same = [a if a != str(data) else str(tmp_path / "data" / ".." / "data") for a in argv]
    assert main([*same, "--resume", "--max-steps", "4"]) == 0
    assert load_run(tmp_path / "r").step == 4
    capsys.readouterr()
    assert main([*argv, "--resume", "--max-steps", "6", "model.dropout=0.3", "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.image_size=32 (saved: 16)" in err and "model.dropout=0.3 (saved: 0.1)" in err
    # an override right after --resume is an override, not --resume's value
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "train.max_steps=6", "--no-progress"]) == 0
    assert load_run(tmp_path / "r").step == 6


def test_resume_auto_starts_then_resumes_and_restarts_a_job_that_died_before_its_first_checkpoint(tmp_path):
    data = image_folder(tmp_path / "data")
    run = tmp_path / "r"
    argv = ["train", "--data", str(data), "--out", str(run), "--resume", "auto", *TRAIN]
    # a first attempt that died before any checkpoint: config and a log line, nothing to resume
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    assert main([*argv, "--max-steps", "3"]) == 0
    assert load_run(run).step == 3 and steps_logged(run) == [2, 3]
    assert main([*argv, "--max-steps", "6"]) == 0
    assert load_run(run).step == 6 and steps_logged(run) == [2, 3, 4, 6]
    fresh = tmp_path / "fresh"
    assert main(["train", "--data", str(data), "--out", str(fresh), *TRAIN, "--max-steps", "3"]) == 0
    assert main(["train", "--data", str(data), "--out", str(fresh), "--resume", *TRAIN, "--max-steps", "6"]) == 0
    same_weights(run, fresh)


# -- a full disk ------------------------------------------------------------------------------------

def _limited(limit: int):
    def preexec() -> None:  # files may not grow past `limit` bytes; a write past it fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def difflab(args: list[str], limit: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          preexec_fn=_limited(limit) if limit else None)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    data = image_folder(tmp_path / "data")
    run = tmp_path / "r"
    env = {"DIFFLAB_CACHE": str(tmp_path / "cache")}
    first = difflab(["train", "--data", str(data), "--out", str(run), *TRAIN, "--max-steps", "2"], env=env)
    assert first.returncode == 0, first.stderr
    # files may not exceed 64 KiB from now on: the log and state.json fit, the weights do not
    full = difflab(["train", "--data", str(data), "--out", str(run), "--resume", *TRAIN, "--max-steps", "4"],
                   limit=64 << 10, env=env)
    err = full.stderr.strip()
    assert full.returncode == 2 and err.count("\n") == 0, err
    assert "could not write checkpoint" in err and "step-0000004" in err and "File too large" in err
    assert "step-0000002 is intact" in err
    assert load_run(run).step == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no temporary directory left
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    # sampling into a full disk: one line naming the image file
    out = tmp_path / "imgs"
    sample = difflab(["sample", "--run", str(run), "-n", "2", "--out", str(out), "--no-progress"], limit=200)
    err = sample.stderr.strip()
    assert sample.returncode == 2 and err.count("\n") == 0 and "could not write" in err and str(out) in err, err
    assert not [p for p in out.iterdir() if p.suffix == ".jpg"] if out.exists() else True


# -- kill -9 at the worst moments, resumed by the same command line ---------------------------------

def _bench_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", Path(__file__).parents[1] / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_9_while_writing_checkpoints_and_previews_loses_nothing(tmp_path):
    """The short form of bench/faults.py: SIGKILL while a checkpoint is being written, while a preview
    grid is, and while a checkpoint is again; every checkpoint on disk loads after each kill, and the
    job resumed with `--resume auto` ends bit-identical to an uninterrupted one."""
    faults = _bench_faults()
    data = faults.make_data(tmp_path / "data", n=32)
    result = faults.kill_loop(data, tmp_path, kills=3, steps=24, verbose=False,
                              moments=("checkpoint", "preview", "checkpoint"))
    assert result["kills"] == 3 and result["corrupt"] == 0 and result["maxdiff"] == 0.0
    assert result["moments"].get("checkpoint write", 0) >= 1


@pytest.mark.parametrize("err", ["EROFS", "EACCES", "ENOSPC"])
def test_a_refused_write_is_one_line_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, err):
    """Read-only file systems and permissions cannot be staged as root in a test: the rename (EROFS,
    EACCES) or the write (ENOSPC) fails as the kernel would make it fail."""
    import errno

    from difflab import io
    from difflab.errors import OutputError

    target = tmp_path / "out" / "x.json"
    io.atomic_write_json(target, {"old": True})
    code = getattr(errno, err)
    if err == "ENOSPC":
        def write(self, data):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(Path, "write_bytes", write)
    else:
        def replace(src, dst):
            raise OSError(code, os.strerror(code), str(dst))
        monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OutputError) as e:
        io.atomic_write_json(target, {"old": False})
    monkeypatch.undo()
    assert str(e.value) == f"could not write {target}: {os.strerror(code)}"
    assert json.loads(target.read_text()) == {"old": True} and [p.name for p in target.parent.iterdir()] == ["x.json"]
