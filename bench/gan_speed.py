"""Sampling speed of the GANs against a diffusion run's samplers, side by side (issue 18).

    python bench/gan_speed.py --diffusion runs/ladder/best-20 --gans runs/ladder/stylegan-20,runs/ladder/ddgan-20

Each variant makes the same number of images per timing (``--n``, in batches of ``--batch``), the
variants interleaved (A B C A B C ...) for ``--rounds`` rounds; medians. Diffusion: DPM-Solver++(2M) at
20 network calls (``--sampler``/``--steps`` to change) and the run's own sampler. GANs: one generator
call (StyleGAN) or T (DDGAN), each GAN in fp32 (``--precision fp32``) and in bf16 autocast (``--precision
bf16``, what ``difflab gan sample``'s default, auto, picks on this CPU). All in the same process, the
same threads, bf16 autocast for the diffusion network where the machine has it (as `difflab sample` runs).
Last line: ``RUN_PRECISION_over_dpmpp20=...`` for every GAN run and precision (images/s ratio).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from difflab.gan.sample import generate, load_gan
from difflab.runs import load_run
from difflab.samplers import SamplerConfig, SamplerKind, sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diffusion", required=True)
    p.add_argument("--gans", required=True, help="comma list of GAN run folders")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    run = load_run(args.diffusion)
    den = run.denoiser()
    variants: dict[str, Callable[[], object]] = {}
    fast = SamplerConfig(sampler=SamplerKind.DPMPP_2M, steps=args.steps)
    T = run.schedule.num_timesteps
    own = run.config.sampler
    variants[f"diffusion dpmpp-2m ({fast.nfe(T)} NFE)"] = lambda: sample(
        den, args.n, run.image_shape, fast, seed=0, batch_size=args.batch, progress=False)
    variants[f"diffusion {own.sampler.value} ({own.nfe(T)} NFE, the run's)"] = lambda: sample(
        den, args.n, run.image_shape, own, seed=0, batch_size=args.batch, progress=False)
    names = {}
    for path in args.gans.split(","):
        for precision in ("fp32", "bf16"):
            gan = load_gan(path, precision=precision)
            nfe = gan.config.schedule.timesteps if gan.config.kind.value == "ddgan" else 1
            name = f"{Path(path).name}: {gan.config.kind.value} ({nfe} NFE), {precision}"
            names[f"{Path(path).name}_{precision}"] = name

            def run_gan(gan=gan) -> None:
                for lo in range(0, args.n, args.batch):
                    generate(gan, range(lo, min(lo + args.batch, args.n)), seed=0)
            variants[name] = run_gan
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():  # warm-up (oneDNN primitives, allocations)
            f()
        for _ in range(args.rounds):
            for name, f in variants.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    print(f"{args.n} images per timing, batch {args.batch}, {torch.get_num_threads()} threads, medians of {args.rounds}")
    print("| sampler | images/s |\n|---|---:|")
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    for k, v in rate.items():
        print(f"| {k} | {v:.1f} |")
    dpm = rate[next(iter(variants))]
    print(" ".join(f"{kind}_over_dpmpp{args.steps}={rate[name] / dpm:.1f}" for kind, name in names.items()))
    print(f"(runs: {Path(args.diffusion).name}, {', '.join(Path(g).name for g in args.gans.split(','))})")


if __name__ == "__main__":
    main()
