"""Two CPU processes under torchrun (gloo): DDP keeps the ranks' weights identical and rank 0 saves."""
import json
import os
import subprocess
import sys

import torch
from PIL import Image

from difflab.train import checkpoint as ckpt_mod


def test_torchrun_two_processes(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(32):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(data / f"{k}.png")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "difflab.cli", "train", "--data", str(data), "--out", str(out), "--preset", "tiny",
           "--image-size", "16", "--batch-size", "8", "--max-steps", "4", "--no-progress",
           "train.sample_every=0", "train.precision=fp32", "train.checkpoint_every=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["images_seen"] == 32
    weights = ckpt_mod.load_tensors(out / "model.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())
