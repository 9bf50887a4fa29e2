"""One AdamW step on a preset's parameters, three implementations interleaved: torch's default for CPU
tensors (single-tensor loop), ``foreach=True`` and ``fused=True`` (what difflab's trainer uses: it also
skips a non-finite step on the device). Parameters in the trainer's layout (channels_last convolution
weights) unless --contiguous.

    python bench/adamw.py --preset small --rounds 7

Prints the median ms per step of each, and the final line ``ratio default/fused=...``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from difflab.config import resolve_config
from difflab.models.unet import UNet
from difflab.precision import to_memory_format


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timing")
    p.add_argument("--contiguous", action="store_true")
    args = p.parse_args()
    cfg = resolve_config(preset=args.preset, flags={"data.source": "x"})
    model = UNet(cfg.model)
    if not args.contiguous:
        model = to_memory_format(model, torch.channels_last)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g).to(memory_format=torch.preserve_format) for p in params]
    variants = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    copies = {}
    for name, kw in variants.items():
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for q, gr in zip(ps, grads):
            q.grad = gr.clone().to(memory_format=torch.channels_last) if q.dim() == 4 and not args.contiguous else gr.clone()
        copies[name] = (ps, torch.optim.AdamW(ps, lr=1e-4, **kw))
        copies[name][1].step()  # states allocated
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name in variants:  # interleaved: A B C A B C ...
            opt = copies[name][1]
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    n = sum(p.numel() for p in params)
    print(f"preset {args.preset} ({n / 1e6:.2f} M parameters, {'contiguous' if args.contiguous else 'channels_last'}), "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} x {args.steps} steps")
    print("| implementation | ms per step |\n|---|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(copies["default"][0], copies["fused"][0]))
    print(f"default and fused agree to 1e-5 after {1 + args.rounds * args.steps} steps: {same}")
    print(f"ratio default/fused={med['default'] / med['fused']:.2f} foreach/fused={med['foreach'] / med['fused']:.2f}")


if __name__ == "__main__":
    main()
