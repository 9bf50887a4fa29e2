"""Two one-thread processes (``difflab train --procs 2``: two gloo ranks) against one two-thread process:
training images per second of a recipe on this CPU, at the same global batch.

The two forms train the same model on the same draws (each example's timestep, noise and augmentation
come from its own generator, so 2 ranks of 32 see what 1 process of 64 sees: same loss curve up to
reduction order, ``tests/test_distributed.py``); only the rate differs. The variants alternate
(A B A B ...), each a fresh ``difflab train`` of ``--steps`` steps; the rate is the median of the run's
logged ``images_per_s`` after the first ``--skip`` steps (start-up, data decoding and the first steps'
allocations left out). Nothing else should run beside it.

    python bench/procs.py --data runs/ladder/train --recipe best --steps 120 --rounds 2
    python bench/procs.py --data runs/ladder/train --latent-of runs/ladder/latent64-20-ae --steps 400 --skip 50 \
        --rounds 2 data.augment.hflip=true

Last line: ``ranks2_over_threads2=<ratio of median rates>``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("threads2", "ranks2")


def rate(run: Path, skip: int) -> float:
    """Median images/s over the run's log records past step ``skip``."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r["step"] > skip]
    if not rates:
        raise SystemExit(f"{run}: no log record past step {skip}; raise --steps")
    return statistics.median(rates)


def train(variant: str, run: Path, args: argparse.Namespace) -> float:
    procs, threads = (["--procs", "2"], "1") if variant == "ranks2" else ([], "2")
    size = ["--latent-of", args.latent_of] if args.latent_of else ["--image-size", str(args.image_size)]
    cmd = [sys.executable, "-m", "difflab", "train", "--recipe", args.recipe, "--data", args.data, *size,
           "--out", str(run), "--no-progress", "--max-steps", str(args.steps), "--minutes", "0",
           *procs, "train.log_every=10", "train.sample_every=0", "train.checkpoint_every=1000000", *args.overrides]
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, check=True)
    return rate(run, args.skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of images")
    p.add_argument("--recipe", default="best")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--latent-of", metavar="AE_RUN", help="a latent run on this autoencoder's latents (the ladder's "
                   "latent rung: runs/ladder/latent64-20-ae); --image-size is then the autoencoder's")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=20, help="steps left out of the rate")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key=value settings for both variants")
    args = p.parse_args()
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    work = Path(tempfile.mkdtemp(prefix="difflab-procs-"))
    try:
        for k in range(args.rounds):
            for variant in VARIANTS:
                run = work / f"{variant}-{k}"
                rates[variant].append(train(variant, run, args))
                print(f"round {k} {variant}: {rates[variant][-1]:.1f} images/s", flush=True)
                shutil.rmtree(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {v: statistics.median(r) for v, r in rates.items()}
    what = f"latents of {args.latent_of}" if args.latent_of else f"{args.image_size} px"
    print(f"\n{args.recipe}, {what}, {args.steps} steps per run, median of {args.rounds} runs "
          f"(rates past step {args.skip})\n")
    print("| variant | images/s (each run) | median |")
    print("|---|---|---:|")
    for v in VARIANTS:
        print(f"| {v} | {', '.join(f'{x:.1f}' for x in rates[v])} | {med[v]:.1f} |")
    print(f"ranks2_over_threads2={med['ranks2'] / med['threads2']:.2f}")


if __name__ == "__main__":
    main()
