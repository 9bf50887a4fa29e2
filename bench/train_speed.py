"""Training speed: difflab's training step against diffusers' UNet2DModel at a matched architecture.

Each variant does full training steps (batch, noise, timesteps, forward, loss, backward, AdamW),
interleaved A B C, A B C, ... in one process; the table reports medians.

    difflab         difflab's Trainer step as `difflab train` runs it: bf16 autocast where the CPU has
                    native bf16, channels_last, EMA update, batch augmentation from a uint8 tensor
    diffusers_fp32  diffusers' UNet2DModel in a plain loop, as its unconditional-training example runs it
    diffusers_bf16  the same with bf16 autocast and channels_last (its best on a CPU)
    difflab_group16, difflab_layernorm, difflab_compile  (optional, --variants) difflab with GroupNorm of
                    16 channels per group (the `default` preset's own norm), with per-pixel LayerNorm, or
                    with train.compile=true; each gets a speed-up line, the norm variants also their
                    own ratios to diffusers

Architecture (issue 7): 32x32 RGB, channels 64/128/256, 2 blocks per level, attention at 16x16 and in
the middle, GroupNorm(32), batch 64. Achieved TFLOP/s count forward + backward as 3x the forward's
FLOPs (torch's flop counter) against the machine's measured bf16 convolution rate. Peak resident
memory comes from a fresh process per variant.

    pip install -e '.[bench]'
    python bench/train_speed.py [--batch 64] [--rounds 5] [--per-round 2]

Last line: ``train_ratio_vs_diffusers_fp32=X train_ratio_vs_diffusers_bf16=Y`` (difflab's steps per
second over diffusers').
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    conv_peak_tflops, difflab_config, diffusers_unet, forward_flops, interleave, n_params, own_peak_rss_mib, parse_variants,
    peak_rss_mib_of, IMAGE_SIZE, CHANNELS, NORM_VARIANTS,
)

VARIANTS = ("difflab", "diffusers_fp32", "diffusers_bf16")
# Optional difflab variants and their config overrides: torch.compile (inductor), other norm layers.
DIFFLAB_EXTRAS = {"difflab_compile": ["train.compile=true"], **NORM_VARIANTS}
OPTIONAL = tuple(DIFFLAB_EXTRAS)


def synthetic_images(n: int = 1024):
    from difflab.data.dataset import ImageData

    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8),
                     None, "synthetic", 0)


def make_difflab(batch: int, workdir: Path, name: str = "difflab") -> tuple[Callable[[], None], torch.nn.Module, Callable[[], object]]:
    from difflab.train import Trainer

    cfg = difflab_config(batch, DIFFLAB_EXTRAS.get(name, []))
    trainer = Trainer(cfg, workdir / name, data=synthetic_images(), progress=False)
    trainer.model.train()
    sums = torch.zeros(2, 4)

    def step() -> None:
        trainer._train_step(sums)

    x = torch.randn(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,)).float()
    return step, trainer.model, lambda: trainer.model(x, t)


def make_diffusers(batch: int, bf16: bool) -> tuple[Callable[[], None], torch.nn.Module, Callable[[], object]]:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = diffusers_unet().train()
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = synthetic_images().images
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = torch.randint(0, len(data), (batch,), generator=g)
        clean = (data[idx].float() / 127.5 - 1).contiguous(memory_format=fmt)
        noise = torch.randn(clean.shape, generator=g).contiguous(memory_format=fmt)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = sched.add_noise(clean, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(noisy, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    x = torch.randn(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,))
    return step, model, lambda: model(x, t)


def build(name: str, batch: int, workdir: Path):
    if name.startswith("difflab"):
        return make_difflab(batch, workdir, name)
    return make_diffusers(batch, bf16=name == "diffusers_bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS + OPTIONAL)}")
    p.add_argument("--memory-of", choices=VARIANTS + OPTIONAL, help=argparse.SUPPRESS)  # child process: 3 steps, print peak RSS
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = parse_variants(args.variants, VARIANTS, OPTIONAL)

    with tempfile.TemporaryDirectory() as tmp:
        if args.memory_of:
            step, _, _ = build(args.memory_of, args.batch, Path(tmp))
            for _ in range(3):
                step()
            print(f"{own_peak_rss_mib():.1f}")
            return
        built = {name: build(name, args.batch, Path(tmp)) for name in names}
        first = {}
        for name, (step, _, _) in built.items():  # the first step pays for compilation and one-off setup
            t0 = time.perf_counter()
            step()
            first[name] = time.perf_counter() - t0
        flops = {}
        for name, (_, model, fwd) in built.items():
            with torch.no_grad():
                flops[name] = 3 * forward_flops(fwd)  # forward + backward ~ 3 forwards
        print(f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
        for name, (_, model, _) in built.items():
            print(f"  {name:15s} {n_params(model) / 1e6:6.2f} M parameters, {flops[name] / 1e9 / args.batch:6.2f} GFLOP/image per step")
        times = interleave({k: v[0] for k, v in built.items()}, args.rounds, args.per_round)
    peak = conv_peak_tflops()
    mem = {} if args.no_memory else {
        name: peak_rss_mib_of(__file__, ["--memory-of", name, "--batch", str(args.batch), "--threads", str(args.threads)])
        for name in names
    }
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmeasured bf16 conv peak (128-ch 3x3, channels_last): {peak:.2f} TFLOP/s")
    print("| variant | first step (s) | s/step (median) | images/s | TFLOP/s | % of bf16 conv peak | peak RSS (MiB) | difflab speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        tflops = flops[name] / med[name] / 1e12
        print(f"| {name} | {first[name]:.1f} | {med[name]:.3f} | {args.batch / med[name]:.1f} | {tflops:.3f} | {100 * tflops / peak:.1f}% | "
              f"{mem.get(name, float('nan')):.0f} | {med[name] / med['difflab']:.2f}x |")
    if "difflab_compile" in names:
        print(f"compile_speedup={med['difflab'] / med['difflab_compile']:.2f} (difflab eager s/step over compiled)")
    for name in NORM_VARIANTS:
        if name in names:
            print(f"{name.removeprefix('difflab_')}_speedup={med['difflab'] / med[name]:.2f} (difflab s/step over {name}'s)")
            print(f"  {name}: " + " ".join(f"train_ratio_vs_{k}={med[k] / med[name]:.2f}" for k in names if k.startswith("diffusers")))
    print(" ".join(f"train_ratio_vs_{k}={med[k] / med['difflab']:.2f}" for k in names if k.startswith("diffusers")))


if __name__ == "__main__":
    main()
