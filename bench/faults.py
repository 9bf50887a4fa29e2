"""Kill a training job at random moments, resume it each time with the same command line, and check
that nothing is lost: every checkpoint on disk loads after every kill, and the final weights equal an
uninterrupted run's bit for bit.

    python bench/faults.py                      # 24 kill -9 + the 2-rank SIGTERM check
    python bench/faults.py --kills 6 --no-torchrun

The job is a tiny UNet on 64 synthetic 16 px images with `--resume auto`, a checkpoint every 4 steps
(2 kept), a preview grid every 10 and dropout on (its random stream must survive). The kills cycle
through four kinds of moment: a random time (anywhere: start-up, data loading, steps, previews), while
a checkpoint is being written (a `step-N.tmp-*` file is open), while a preview grid is being written,
and during start-up (before the first step). Each kill is SIGKILL: no handler runs.

Then, with --torchrun (default): a 2-rank gloo job under torchrun gets SIGTERM mid-run, must save and
exit, and its resumption must end equal to an uninterrupted 2-rank run.

Prints one line per kill, a table of kill moments, and the final line
`kills=N corrupt=C final_maxdiff=D` (C = 0 and D = 0 is the promise).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from difflab.errors import CheckpointError
from difflab.train.checkpoint import load_tensors

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MOMENTS = ("random", "checkpoint", "random", "preview", "startup")


def make_data(root: Path, n: int = 64, size: int = 16) -> Path:
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"{k}.png")
    return root


def train_argv(data: Path, run: Path, steps: int, *, checkpoint_every: int = 4, sample_every: int = 10) -> list[str]:
    return ["train", "--data", str(data), "--image-size", "16", "--preset", "tiny", "--batch-size", "8",
            "--out", str(run), "--resume", "auto", "--max-steps", str(steps), "--no-progress",
            f"train.checkpoint_every={checkpoint_every}", "train.keep_checkpoints=2", f"train.sample_every={sample_every}",
            "train.sample_grid_size=4", "train.log_every=2", "model.dropout=0.1", "train.precision=fp32"]


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "difflab", *argv], env={**ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _open_files(pid: int) -> list[str]:
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return out


def _writing(files: list[str]) -> str | None:
    if any(".tmp-" in f and "/checkpoints/" in f for f in files):
        return "checkpoint"
    if any("/samples/." in f for f in files):
        return "preview"
    return None


def kill_at(proc: subprocess.Popen, run: Path, moment: str, rng: random.Random, timeout: float = 60.0) -> str:
    """SIGKILL ``proc`` at a moment of the given kind; return what it was doing (or 'finished')."""
    t0 = time.monotonic()
    log = run / "log.jsonl"
    logged = log.stat().st_size if log.exists() else 0
    if moment == "random":
        deadline = t0 + rng.uniform(0.5, 8.0)
    elif moment == "startup":
        deadline = t0 + rng.uniform(0.2, 2.5)
    else:
        deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "finished"
        if moment in ("checkpoint", "preview") and _writing(_open_files(proc.pid)) == moment:
            break
        time.sleep(0.0005 if moment in ("checkpoint", "preview") else 0.01)
    doing = _writing(_open_files(proc.pid))
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if doing:
        return f"{doing} write"
    if (log.stat().st_size if log.exists() else 0) <= logged:  # nothing logged by this attempt
        return "start-up / data loading / first steps"
    return "training steps / preview sampling"


def check_checkpoints(run: Path) -> list[str]:
    """Every complete checkpoint on disk, and what latest.json and the run's weight links name, must load."""
    problems = []
    root = run / "checkpoints"
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name) \
        if root.exists() else []
    for d in dirs:
        try:
            state = json.loads((d / "state.json").read_text())
            assert isinstance(state["step"], int)
            for name in ("model", "ema", "train_state"):
                load_tensors(d / f"{name}.safetensors")
        except (OSError, ValueError, KeyError, AssertionError, CheckpointError) as e:
            problems.append(f"{d.name}: {e}")
    if (run / "latest.json").exists():
        try:
            named = run / json.loads((run / "latest.json").read_text())["checkpoint"]
            if not named.is_dir():
                problems.append(f"latest.json names missing {named.name}")
            for name in ("model", "ema"):
                load_tensors(run / f"{name}.safetensors")
        except (OSError, ValueError, KeyError, CheckpointError) as e:
            problems.append(f"latest: {e}")
    return problems


def max_diff(a: Path, b: Path) -> float:
    worst = 0.0
    for name in ("model", "ema"):
        ta, tb = load_tensors(a / f"{name}.safetensors"), load_tensors(b / f"{name}.safetensors")
        if ta.keys() != tb.keys():
            return float("inf")
        for k in ta:
            worst = max(worst, float((ta[k].double() - tb[k].double()).abs().max()))
    return worst


def kill_loop(data: Path, work: Path, kills: int, steps: int, seed: int = 0, verbose: bool = True,
              moments: tuple[str, ...] = MOMENTS) -> dict:
    """Train with `--resume auto`, killed ``kills`` times, then to the end; compare with a straight run."""
    rng = random.Random(seed)
    run, ref = work / "killed", work / "straight"
    done = subprocess.run([sys.executable, "-m", "difflab", *train_argv(data, ref, steps)], env=ENV,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the uninterrupted run failed: {done.stderr.strip()}")
    what: Counter[str] = Counter()
    corrupt, attempts = 0, 0
    while what.total() - what["finished"] < kills:
        attempts += 1
        moment = moments[(attempts - 1) % len(moments)]
        proc = start(train_argv(data, run, steps))
        doing = kill_at(proc, run, moment, rng)
        if doing == "finished":
            err = proc.stderr.read() if proc.stderr else ""
            if proc.returncode:
                raise RuntimeError(f"attempt {attempts} failed: {err.strip()}")
            break
        what[doing] += 1
        problems = check_checkpoints(run)
        corrupt += len(problems)
        step = json.loads((run / "latest.json").read_text())["step"] if (run / "latest.json").exists() else 0
        if verbose:
            print(f"kill {what.total():2d} ({moment:10s}): {doing:34s} latest checkpoint step {step:4d}"
                  + (f"  PROBLEMS: {problems}" if problems else ""), flush=True)
    final = subprocess.run([sys.executable, "-m", "difflab", *train_argv(data, run, steps)], env=ENV,
                           capture_output=True, text=True)
    if final.returncode:
        raise RuntimeError(f"the final resume failed: {final.stderr.strip()}")
    corrupt += len(check_checkpoints(run))
    if what.total() - what["finished"] < kills:
        print(f"warning: the job finished after {what.total()} kills; give more --steps", flush=True)
    return {"kills": what.total(), "moments": dict(what), "corrupt": corrupt, "maxdiff": max_diff(ref, run)}


def torchrun_sigterm(data: Path, work: Path, steps: int = 40, port: int = 29611) -> dict:
    """A 2-rank job gets SIGTERM (as a preempting scheduler sends) once it has trained a little: it must
    save at a step both ranks agree on and exit; resumed, it must end equal to an uninterrupted job."""
    def launch(run: Path) -> subprocess.Popen:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "difflab", *train_argv(data, run, steps, checkpoint_every=100, sample_every=0)]
        return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref, run = work / "ddp-straight", work / "ddp-term"
    out, _ = launch(ref).communicate(timeout=600)
    proc = launch(run)
    t0 = time.monotonic()
    while not (run / "log.jsonl").exists() or len((run / "log.jsonl").read_text().splitlines()) < 3:
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            raise RuntimeError("the 2-rank job ended before it could be signalled")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    saved = json.loads((run / "latest.json").read_text())["step"] if (run / "latest.json").exists() else None
    stopped_early = saved is not None and saved < steps
    problems = check_checkpoints(run)
    out2, _ = launch(run).communicate(timeout=600)
    return {"saved_step": saved, "stopped_early": stopped_early, "corrupt": len(problems) + len(check_checkpoints(run)),
            "maxdiff": max_diff(ref, run), "tail": out.strip().splitlines()[-3:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--steps", type=int, default=2000, help="training steps of the job (enough to outlast the kills)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torchrun", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difflab-faults-"))
    try:
        data = make_data(work / "data")
        t0 = time.monotonic()
        res = kill_loop(data, work, args.kills, args.steps, args.seed)
        print("\n| kill moment | count |\n|---|---:|")
        for k, v in sorted(res["moments"].items()):
            print(f"| {k} | {v} |")
        print(f"\nkill loop: {res['kills']} kills in {time.monotonic() - t0:.0f} s, corrupt checkpoints {res['corrupt']}, "
              f"final max |difference| to the uninterrupted run {res['maxdiff']:g}")
        corrupt, worst = res["corrupt"], res["maxdiff"]
        kills = res["kills"]
        if args.torchrun:
            tr = torchrun_sigterm(data, work)
            print(f"torchrun 2 ranks, SIGTERM: saved at step {tr['saved_step']} (stopped early: {tr['stopped_early']}), "
                  f"corrupt {tr['corrupt']}, final max |difference| {tr['maxdiff']:g}")
            corrupt += tr["corrupt"]
            worst = max(worst, tr["maxdiff"])
            kills += 1
        print(f"kills={kills} corrupt={corrupt} final_maxdiff={worst:g}")
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
