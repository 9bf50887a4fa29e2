"""Shared pieces of the speed benchmarks: the matched diffusers model, timing, FLOPs, peak memory.

diffusers is a bench-only dependency (``pip install -e .[bench]``); nothing in ``src/`` imports it.
"""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

# The matched architecture of issue 7: 32x32 RGB, channels 64, 128, 256, 2 blocks per level,
# attention at 16x16 (one 64-channel head per 64 channels), GroupNorm(32), no dropout. (difflab's
# `default` preset itself has GroupNorm with 16 channels per group: the `difflab_group16` variant.)
IMAGE_SIZE, CHANNELS = 32, 3
DIFFLAB_OVERRIDES = ["model.dropout=0", "model.head_channels=64", "model.norm_groups=32", "model.norm_group_channels=0"]
# Optional difflab variants of the speed benches with other norm layers (not the matched architecture
# any more, but the same parameter count): every GroupNorm replaced by a LayerNorm over each pixel's
# channels, or GroupNorm with 16 channels per group instead of 32 groups (the `default` preset's own).
NORM_VARIANTS = {"difflab_layernorm": ["model.norm=layer"], "difflab_group16": ["model.norm_group_channels=16"]}


def diffusers_unet():
    """diffusers' UNet2DModel at the matched architecture (attention in the 16x16 level and, as
    in difflab, in the middle)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64, norm_num_groups=32, dropout=0.0,
    )


def difflab_config(batch_size: int, extra: list[str] = ()):
    from difflab.config import resolve_config

    return resolve_config(
        preset="default",
        flags={"data.source": "synthetic", "data.image_size": IMAGE_SIZE, "data.channels": CHANNELS},
        overrides=[*DIFFLAB_OVERRIDES, f"train.batch_size={batch_size}", "train.sample_every=0", "train.log_every=1000000",
                   *extra],
    )


def parse_variants(text: str, variants: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    """The ``--variants`` comma list of a speed bench, checked: known names, difflab among them."""
    names = [v.strip() for v in text.split(",")]
    if not set(names) <= set(variants + optional) or "difflab" not in names:
        raise SystemExit(f"--variants: choose from {', '.join(variants + optional)}, including difflab")
    return names


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (convolutions, matmuls, attention) by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv_peak_tflops(dtype=torch.bfloat16, repeats: int = 5) -> float:
    """The machine's bf16 convolution rate: a 128-channel 3x3 conv on 64 x 32 x 32 maps, channels_last,
    forward only (the reference figure of the project notes)."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(64, 128, 32, 32).contiguous(memory_format=torch.channels_last)
    flops = 2 * 64 * 128 * 128 * 9 * 32 * 32
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not torch.float32):
        conv(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e12


def interleave(variants: dict[str, Callable[[], None]], rounds: int, per_round: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, run A B C, A B C, ... (``per_round`` calls each turn)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {statistics.median(v[-per_round:]):.3f} s" for k, v in times.items()),
              flush=True)
    return times


def peak_rss_mib_of(script: str, args: list[str]) -> float:
    """Peak resident memory (MiB) of ``python script args`` in a fresh process, which prints it last."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def own_peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space made at exec;
    ru_maxrss would also count the parent's pages the child held between fork and exec."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def difflab_cli(*args: str, cwd=None) -> None:
    """Run ``python -m difflab ARGS`` (this interpreter), printing the command; fail on a non-zero exit."""
    print("$ difflab", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "difflab", *args], check=True, cwd=cwd)
