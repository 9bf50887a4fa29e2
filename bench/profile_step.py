"""Where difflab's training step goes: torch.profiler over a few full steps, self CPU time by op family.

The step is bench/train_speed.py's (the matched architecture: 32x32 RGB, 64/128/256 channels, 2 blocks
per level, attention at 16x16 and in the middle, batch 64, bf16 autocast + channels_last), with
GroupNorm(32) (the matched architecture's), GroupNorm with 16 channels per group (``--norm group16``) or LayerNorm over
each pixel's channels (``--norm layer``).

    python bench/profile_step.py [--norm group|group16|layer] [--steps 3]

Last line: ``norm_share=X conv_share=Y`` (the fractions of self CPU time in norm layers, in convolutions).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import make_difflab  # noqa: E402

# Op families, matched in order against the aten op name; the first match wins.
FAMILIES = [
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("mkldnn_convolution", "_convolution", "convolution")),
    ("norm backward (GroupNorm / LayerNorm)", ("native_group_norm_backward", "native_layer_norm_backward")),
    ("norm forward", ("native_group_norm", "native_layer_norm")),
    ("attention (forward + backward)", ("scaled_dot_product", "flash_attention")),
    ("copy_ (casts, layout changes)", ("copy_", "to_copy")),
    ("SiLU (forward + backward)", ("silu",)),
    ("optimizer + EMA", ("lerp", "addcdiv", "addcmul", "sqrt", "_foreach")),
    ("matmuls (linear layers, time embedding)", ("addmm", "mm", "bmm")),
]


def family(name: str) -> str:
    for label, keys in FAMILIES:
        if any(k in name for k in keys):
            return label
    return "everything else (adds, cat, mul, sums, ...)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--norm", choices=("group", "layer", "group16"), default="group")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        variant = {"group": "difflab", "layer": "difflab_layernorm", "group16": "difflab_group16"}[args.norm]
        step, _, _ = make_difflab(args.batch, Path(tmp), variant)
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    shares: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith("aten::") or evt.key.startswith("mkldnn"):
            label = family(evt.key)
            shares[label] = shares.get(label, 0.0) + evt.self_cpu_time_total
    total = sum(shares.values())
    print(f"norm={args.norm}, batch {args.batch}, {args.steps} steps, {total / 1e6 / args.steps:.2f} s of aten self CPU time per step")
    print("| op family | share |")
    print("|---|---:|")
    for label, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {100 * t / total:.1f}% |")
    norm = sum(t for k, t in shares.items() if k.startswith("norm")) / total
    conv = sum(t for k, t in shares.items() if k.startswith("convolution")) / total
    print(f"norm_share={norm:.3f} conv_share={conv:.3f}")


if __name__ == "__main__":
    main()
