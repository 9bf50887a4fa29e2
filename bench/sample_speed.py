"""Sampling speed: difflab's DDIM against diffusers' DDIMPipeline, same architecture, 20 steps.

Variants, interleaved A B C, A B C, ... in one process, each call generating ``--batch`` images:

    difflab         difflab.samplers.sample as `difflab sample` runs it: DDIM, per-image seeds, x0
                    clipping, network in bf16 autocast + channels_last where the CPU has native bf16
    diffusers_fp32  DDIMPipeline(batch_size=B, num_inference_steps=20), as its documentation shows
    diffusers_bf16  the same pipeline with the UNet in channels_last and the call under bf16 autocast
    difflab_layernorm, difflab_group16  (optional, --variants) difflab with model.norm=layer
                    (LayerNorm over each pixel's channels) or model.norm_group_channels=16

Speed only: both networks have their (seeded) initial weights, since the cost of a step does not
depend on them. Architecture as in bench/train_speed.py (32x32 RGB, 64/128/256, attention at 16x16).

    pip install -e '.[bench]'
    python bench/sample_speed.py [--batch 125] [--rounds 8]      # 8 x 125 = 1000 images per variant
    python bench/sample_speed.py --variants difflab,difflab_layernorm,difflab_group16

Last line: ``sample_ratio_vs_diffusers_fp32=X sample_ratio_vs_diffusers_bf16=Y`` (images/s ratios).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CHANNELS, IMAGE_SIZE, NORM_VARIANTS, difflab_config, diffusers_unet, interleave, own_peak_rss_mib,
    parse_variants, peak_rss_mib_of,
)

VARIANTS = ("difflab", "diffusers_fp32", "diffusers_bf16")
OPTIONAL = tuple(NORM_VARIANTS)
STEPS = 20


def make_difflab(batch: int, name: str = "difflab") -> Callable[[], None]:
    from difflab.models.unet import UNet
    from difflab.runs import sampling_denoiser
    from difflab.samplers import SamplerConfig, sample
    from difflab.schedule import NoiseSchedule

    cfg = difflab_config(batch, NORM_VARIANTS.get(name, []))
    torch.manual_seed(0)
    model = UNet(cfg.model).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    den = sampling_denoiser(model, NoiseSchedule(cfg.schedule), cfg.loss, clip="clip", precision="auto")
    scfg = SamplerConfig(sampler="ddim", steps=STEPS)
    calls = iter(range(10**9))

    def run() -> None:
        sample(den, batch, (CHANNELS, IMAGE_SIZE, IMAGE_SIZE), scfg, seed=next(calls), batch_size=batch, progress=False)

    return run


def make_diffusers(batch: int, bf16: bool) -> Callable[[], None]:
    from diffusers import DDIMPipeline, DDIMScheduler

    torch.manual_seed(0)
    unet = diffusers_unet().eval().requires_grad_(False)
    if bf16:
        unet = unet.to(memory_format=torch.channels_last)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pipe(batch_size=batch, num_inference_steps=STEPS, generator=g, output_type="np")

    return run


def build(name: str, batch: int) -> Callable[[], None]:
    if name.startswith("difflab"):
        return make_difflab(batch, name)
    return make_diffusers(batch, bf16=name == "diffusers_bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS + OPTIONAL)}")
    p.add_argument("--memory-of", choices=VARIANTS + OPTIONAL, help=argparse.SUPPRESS)
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = parse_variants(args.variants, VARIANTS, OPTIONAL)
    if args.memory_of:
        build(args.memory_of, args.batch)()
        print(f"{own_peak_rss_mib():.1f}")
        return
    print(f"{args.rounds} rounds x {args.batch} images per variant, DDIM {STEPS} steps, {args.threads} threads, "
          f"torch {torch.__version__}")
    times = interleave({name: build(name, args.batch) for name in names}, args.rounds, 1, warmup=0)
    mem = {} if args.no_memory else {
        name: peak_rss_mib_of(__file__, ["--memory-of", name, "--batch", str(args.batch), "--threads", str(args.threads)])
        for name in names
    }
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: args.batch / v for k, v in med.items()}
    print("| variant | s per batch (median) | images/s | peak RSS (MiB) | difflab speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        print(f"| {name} | {med[name]:.2f} | {rate[name]:.2f} | {mem.get(name, float('nan')):.0f} | "
              f"{rate['difflab'] / rate[name]:.2f}x |")
    for name in NORM_VARIANTS:
        if name in names:
            print(f"{name.removeprefix('difflab_')}_speedup={rate[name] / rate['difflab']:.2f} ({name}'s images/s over difflab's)")
            print(f"  {name}: " + " ".join(f"sample_ratio_vs_{k}={rate[name] / rate[k]:.2f}" for k in names if k.startswith("diffusers")))
    print(" ".join(f"sample_ratio_vs_{k}={rate['difflab'] / rate[k]:.2f}" for k in names if k.startswith("diffusers")))


if __name__ == "__main__":
    main()
