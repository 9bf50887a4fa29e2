"""Two CPU processes under torchrun (gloo): DDP keeps the ranks' weights identical and rank 0 saves."""
import json
import math
import os
import subprocess
import sys

import torch
from PIL import Image

from difflab.train import checkpoint as ckpt_mod

# Each rank trains through the CLI's own code path, then writes the weights it ended with (only rank 0
# writes the run directory, so the other rank's weights are otherwise invisible).
RANK_SCRIPT = """
import os, sys
from pathlib import Path
from safetensors.torch import save_file
from difflab.config import resolve_config
from difflab.train import Trainer

data, out = sys.argv[1], Path(sys.argv[2])
cfg = resolve_config(preset="tiny", flags={"data.source": data, "data.image_size": 16, "train.batch_size": 8,
                                           "train.max_steps": 4},
                     overrides=["train.sample_every=0", "train.precision=fp32", "train.checkpoint_every=2"])
trainer = Trainer(cfg, out / "run", progress=False)
trainer.run()
rank = os.environ["RANK"]
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
save_file({k: v.contiguous() for k, v in trainer.ema.model.state_dict().items()}, str(out / f"ema{rank}.safetensors"))
# the exit handlers leave no process group to interpreter finalization (where gloo can abort the rank)
import atexit
import torch.distributed as dist
assert dist.is_initialized()
atexit._run_exitfuncs()
assert not dist.is_initialized(), "the trainer's process group outlived the exit handlers"
"""


def image_folder(tmp_path):
    """32 random 16 px RGB images."""
    data = tmp_path / "imgs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(32):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(data / f"{k}.png")
    return data


def torchrun(tmp_path, text, nproc, port, *args):
    """Run the script ``text`` under torchrun (CPU, gloo, one thread per rank); its stderr."""
    script = tmp_path / f"script{port}.py"
    script.write_text(text)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_torchrun_two_processes(tmp_path):
    data = image_folder(tmp_path)
    torchrun(tmp_path, RANK_SCRIPT, 2, 29517, data, tmp_path)
    out = tmp_path / "run"
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["images_seen"] == 32
    saved = ckpt_mod.load_tensors(out / "model.safetensors")
    start = ckpt_mod.load_tensors(out / "checkpoints" / "step-0000002" / "model.safetensors")
    ranks = [ckpt_mod.load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    emas = [ckpt_mod.load_tensors(tmp_path / f"ema{r}.safetensors") for r in (0, 1)]
    for name, value in saved.items():
        # the ranks saw different images, yet all-reduced gradients keep them bit-identical
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(emas[0][name], emas[1][name]), name
        assert torch.equal(ranks[0][name], value) and bool(value.isfinite().all())
    assert any(not torch.equal(start[k], saved[k]) for k in saved)  # training moved the weights


# Two ranks with a time budget and rank 1 slower than rank 0: their own clocks would stop them at
# different steps (and leave one waiting in an all-reduce forever); the agreed stop ends both at one step.
TIMED_SCRIPT = """
import os, sys, time, json
from pathlib import Path
from difflab.config import resolve_config
from difflab.train import Trainer

data, out = sys.argv[1], Path(sys.argv[2])
cfg = resolve_config(preset="tiny", flags={"data.source": data, "data.image_size": 16, "train.batch_size": 8,
                                           "train.max_steps": 100000, "train.minutes": 0.1},
                     overrides=["train.sample_every=0", "train.precision=fp32", "train.checkpoint_every=100000",
                                "train.log_every=5"])
trainer = Trainer(cfg, out / "run", progress=False)
rank = int(os.environ["RANK"])
step = trainer._train_step
def slow_step(sums):
    if rank == 1:
        time.sleep(0.05)
    return step(sums)
trainer._train_step = slow_step
result = trainer.run()
(out / f"result{rank}.json").write_text(json.dumps(result))
"""


def test_time_limited_ranks_stop_together(tmp_path):
    data = image_folder(tmp_path)
    torchrun(tmp_path, TIMED_SCRIPT, 2, 29518, data, tmp_path)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["step"] == results[1]["step"] > 0 and {r["stopped_by"] for r in results} == {"minutes"}
    state = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert state["step"] == results[0]["step"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["loss"]) for r in log)


RESUME_SCRIPT = """
import sys
from pathlib import Path
from difflab.config import resolve_config
from difflab.train import Trainer

data, out, steps, resume = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "resume"
cfg = resolve_config(preset="tiny", flags={"data.source": data, "data.image_size": 16, "train.batch_size": 8,
                                           "train.max_steps": steps},
                     overrides=["train.sample_every=0", "train.precision=fp32", "train.checkpoint_every=2"])
Trainer(cfg, out / "run", progress=False, resume=resume).run()
"""


def test_resume_under_another_world_size(tmp_path):
    """2 ranks for 4 steps, then 1 process to step 6, then 2 ranks to step 8: the same global batch
    goes on through the same epoch order, with a warning that the random streams are fresh."""
    data = image_folder(tmp_path)
    def launch(nproc, steps, mode):
        return torchrun(tmp_path, RESUME_SCRIPT, nproc, 29519, data, tmp_path, steps, mode)

    launch(2, 4, "new")
    err = launch(1, 6, "resume")
    assert "trained with 2 process(es), now 1" in err
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["world_size"] == 1 and state["images_seen"] == 48 and state["pos"] == 16  # 2 x 8 (ranks) + 2 x 8
    err = launch(2, 8, "resume")
    assert "trained with 1 process(es), now 2" in err
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 64 and state["epoch"] == 2 and state["pos"] == 0
    weights = ckpt_mod.load_tensors(tmp_path / "run" / "model.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())


CURVE_SCRIPT = """
import sys
from difflab.config import resolve_config
from difflab.train import Trainer

cfg = resolve_config(preset="tiny", flags={"data.source": sys.argv[1], "data.image_size": 16, "train.batch_size": 8,
                                           "train.max_steps": 6},
                     overrides=["train.sample_every=0", "train.precision=fp32", "train.checkpoint_every=100",
                                "train.log_every=1", "model.dropout=0", "data.augment.hflip=true",
                                "data.augment.rotate_degrees=5"])
Trainer(cfg, sys.argv[2], progress=False).run()
"""


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    """Each example's timestep, noise and augmentation come from its own generator, so 2 ranks of 4
    images see exactly the draws 1 process of 8 sees: the same loss curve and the same weights, up to
    floating-point reduction order."""
    data = image_folder(tmp_path)
    torchrun(tmp_path, CURVE_SCRIPT, 2, 29520, data, tmp_path / "two")
    torchrun(tmp_path, CURVE_SCRIPT, 1, 29521, data, tmp_path / "one")
    curves = {n: torch.tensor([json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()])
              for n in ("one", "two")}
    assert len(curves["one"]) == 6 and len(set(curves["one"].tolist())) == 6
    torch.testing.assert_close(curves["two"], curves["one"], rtol=1e-4, atol=0)
    one, two = (ckpt_mod.load_tensors(tmp_path / n / "model.safetensors") for n in ("one", "two"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4)


def test_train_procs_runs_the_command_under_torchrun(tmp_path):
    """`difflab train --procs 2` is the same command as 2 ranks (torchrun's environment, one thread each); a
    global batch the ranks cannot split is refused in one line before anything starts."""
    data = image_folder(tmp_path)
    base = [sys.executable, "-m", "difflab", "train", "--preset", "tiny", "--data", str(data), "--image-size", "16",
            "--max-steps", "4", "--no-progress", "train.sample_every=0", "train.precision=fp32", "train.checkpoint_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*base, "--procs", "2", "--batch-size", "8", "--out", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "difflab: 2 processes of 1 thread(s) (as torchrun --standalone --nproc_per_node 2" in proc.stderr
    assert "--procs" not in proc.stderr.split("torchrun", 1)[1].splitlines()[0]  # the ranks run it without --procs
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["images_seen"] == 32
    proc = subprocess.run([*base, "--procs=2", "--batch-size", "7", "--out", str(tmp_path / "odd")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--procs 2: train.batch_size=7 must be divisible by procs * grad_accum = 2" in proc.stderr
    assert not (tmp_path / "odd").exists()


def test_train_procs_passes_sigterm_on_and_both_ranks_stop_and_save(tmp_path):
    """SIGTERM to `difflab train --procs 2` reaches each rank once, they agree to stop at one step, rank 0
    saves, and the launcher exits 0 like a one-process run would."""
    import signal
    import time

    data = image_folder(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "difflab", "train", "--procs", "2", "--preset", "tiny", "--data", str(data),
         "--image-size", "16", "--batch-size", "8", "--max-steps", "100000", "--out", str(out), "--no-progress",
         "train.sample_every=0", "train.precision=fp32", "train.log_every=1", "train.checkpoint_every=100000"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "(SIGTERM)" in stdout
    state = json.loads((out / "latest.json").read_text())
    saved = json.loads((out / "checkpoints" / f"step-{state['step']:07d}" / "state.json").read_text())
    assert state["step"] >= 1 and saved["world_size"] == 2 and saved["images_seen"] == 8 * state["step"]
