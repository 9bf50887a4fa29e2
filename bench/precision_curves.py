"""Does the bf16 fast path train like fp32? Loss curves of runs that differ only in precision and seed.

Train the four runs (same recipe; `train.precision` and `--seed` differ), then plot them:

    for s in 0 1; do for p in fp32 bf16; do
      OMP_NUM_THREADS=1 difflab train --data fashion-mnist --image-size 28 --out runs/prec/$p-seed$s \\
        --max-steps 300 --batch-size 32 --seed $s --no-progress model.num_res_blocks=1 model.dropout=0 \\
        train.lr=2e-3 train.warmup_steps=100 train.log_every=10 train.sample_every=0 train.precision=$p &
    done; wait; done
    python bench/precision_curves.py runs/prec --out bench/results/precision-curves.png

The long version: the same four runs with ``--max-steps 2000 train.lr_decay=cosine train.log_every=20``
into ``runs/prec-long`` (all four at once, one thread each), then
``python bench/precision_curves.py runs/prec-long --out bench/results/precision-curves-long.png``.

The last line compares the precision gap (bf16 - fp32, same seed) with the seed gap (seed 1 - seed 0,
same precision), both as the mean absolute difference of the logged loss over the second half of
training: ``precision_gap=X seed_gap=Y``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def losses(run: Path) -> tuple[np.ndarray, np.ndarray]:
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return np.array([r["step"] for r in recs]), np.array([r["loss"] for r in recs])


def gap(a: np.ndarray, b: np.ndarray) -> float:
    half = len(a) // 2
    return float(np.abs(a[half:] - b[half:]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="folder with fp32-seed0, bf16-seed0, fp32-seed1, bf16-seed1")
    p.add_argument("--out", type=Path, default=Path("bench/results/precision-curves.png"))
    args = p.parse_args()
    names = ["fp32-seed0", "bf16-seed0", "fp32-seed1", "bf16-seed1"]
    missing = [n for n in names if not (args.root / n / "log.jsonl").is_file()]
    if missing:
        sys.exit(f"{args.root}: missing runs {', '.join(missing)}")
    curves = {n: losses(args.root / n) for n in names}

    from difflab.visualize.figure import new_figure, save_figure

    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for n, (steps, loss) in curves.items():
        ax.plot(steps, loss, label=n, ls="-" if n.startswith("fp32") else "--", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training step (batch 32)")
    ax.set_ylabel("training loss (eps MSE, mean of each logged interval)")
    ax.set_title("bf16 autocast vs fp32: same recipe, two seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, args.out)

    print("| run | mean loss, second half |")
    print("|---|---:|")
    for n, (_, loss) in curves.items():
        print(f"| {n} | {loss[len(loss) // 2:].mean():.5f} |")
    precision_gap = np.mean([gap(curves[f"bf16-seed{s}"][1], curves[f"fp32-seed{s}"][1]) for s in (0, 1)])
    seed_gap = np.mean([gap(curves[f"{p}-seed1"][1], curves[f"{p}-seed0"][1]) for p in ("fp32", "bf16")])
    print(f"precision_gap={precision_gap:.5f} seed_gap={seed_gap:.5f}")


if __name__ == "__main__":
    main()
