"""Classifier-free guidance on Fashion-MNIST (issue 14): accuracy and FID against the guidance weight.

Stages (each skipped when its output exists, so an interrupted run continues):

1. ``runs/fm-cond``: class-conditional (``--labels classes``, condition dropout 0.1) and ``runs/fm-uncond``:
   unconditional, both the ``small`` preset at 28 px for the same number of steps (so the same compute);
2. the FID reference: the first ``--real-n`` (5000) training images written as PNGs once, their
   statistics cached by ``difflab fid-stats``;
3. ``difflab compare`` on the conditional run: 100 images of each class (n = 1000) per guidance weight,
   FID, KID and conditional accuracy (judged by a classifier trained on the labelled training data);
   and on the unconditional run: 1000 images, FID and KID, same sampler and seeds.

Prints the table (w, FID, KID, accuracy, images/s) and a final line with the best weight (the lowest FID
among the weights with accuracy >= 0.9), its FID over the unconditional model's, and the cost of guidance
(images/s at w = 1 over the first guided weight; bench/guidance_cost.py measures it interleaved).

    python bench/guidance_fmnist.py --steps 3000 --sampler dpmpp-2m-sde-20 --guidance 0,1,2,3,5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import difflab_cli  # noqa: E402




def real_folder(out: Path, n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images as 28 px PNGs (the FID reference: Inception features
    of all 60,000 would take over an hour on 2 cores)."""
    folder = out / f"fmnist-train-png-{n}"
    if not (folder / f"{n}.png").is_file():
        from difflab.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
        from difflab.visualize.images import save_numbered

        images, _ = load_fashion_mnist(find_fashion_mnist(None, "train"), "train")
        save_numbered(images[:n], folder, 0, "png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--sampler", default="dpmpp-2m-sde-20")
    p.add_argument("--guidance", default="0,1,2,3,5")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--runs", default="runs")
    p.add_argument("--real-n", type=int, default=5000, help="training images in the FID reference")
    args = p.parse_args()
    runs = ROOT / args.runs
    cond, uncond = runs / "fm-cond", runs / "fm-uncond"
    common = ["--data", "fashion-mnist", "--image-size", "28", "--max-steps", str(args.steps), "--no-progress",
              "train.sample_every=500"]
    if not (cond / "model.safetensors").exists():
        difflab_cli("train", "--labels", "classes", "--out", str(cond), *common)
    if not (uncond / "model.safetensors").exists():
        difflab_cli("train", "--out", str(uncond), *common)
    real = real_folder(runs, args.real_n)
    difflab_cli("fid-stats", str(real), "--no-progress")
    if not (cond / "guidance" / "compare.json").exists():
        difflab_cli("compare", "--run", str(cond), "--samplers", args.sampler, "--class", "all", "-n", str(args.per_class),
           "--guidance", args.guidance, "--real", str(real), "--metrics", "fid,kid,accuracy", "--out", str(cond / "guidance"),
           "--no-progress")
    if not (uncond / "compare" / "compare.json").exists():
        difflab_cli("compare", "--run", str(uncond), "--samplers", args.sampler, "-n", str(10 * args.per_class),
           "--real", str(real), "--metrics", "fid,kid", "--out", str(uncond / "compare"), "--no-progress")
    rows = json.loads((cond / "guidance" / "compare.json").read_text())["rows"]
    base = json.loads((uncond / "compare" / "compare.json").read_text())["rows"][0]
    print("\n| model | w | FID | KID x1000 | accuracy | images/s |\n|---|---:|---:|---:|---:|---:|")
    print(f"| unconditional | - | {base['fid']:.2f} | {1000 * base['kid_mean']:.2f} | - | {base['images_per_s']:.1f} |")
    for r in rows:
        print(f"| conditional | {r['guidance']:g} | {r['fid']:.2f} | {1000 * r['kid_mean']:.2f} | "
              f"{r['accuracy']['class']:.3f} | {r['images_per_s']:.1f} |")
    # the best weight: the lowest FID among the weights that reach the accuracy goal (else the most accurate)
    good = [r for r in rows if r["accuracy"]["class"] >= 0.9]
    best = min(good, key=lambda r: r["fid"]) if good else max(rows, key=lambda r: r["accuracy"]["class"])
    one = next((r for r in rows if r["guidance"] == 1.0), None)
    guided = [r for r in rows if r["guidance"] not in (0.0, 1.0)]
    cost = (one["images_per_s"] / guided[0]["images_per_s"]) if one and guided else float("nan")
    print(f"best_w={best['guidance']:g} accuracy={best['accuracy']['class']:.3f} fid_at_best={best['fid']:.2f} "
          f"fid_unconditional={base['fid']:.2f} fid_ratio={best['fid'] / base['fid']:.3f} cfg_slowdown={cost:.2f}")

if __name__ == "__main__":
    main()
