"""Norm layer + SiLU, forward and backward, on one activation: which norm, in which layout.

All under bf16 autocast as difflab trains by default (on torch 2.13 both norms take the bf16
activation with fp32 parameters and return bf16, accumulating in fp32; no casts around them):

    GN                 nn.GroupNorm(32) on the channels_last activation (DDPM's 32 groups,
                       model.norm_group_channels=0): 4 channels per group at 128 channels
    GN, 16 ch/group    nn.GroupNorm(8) on the same activation (model.norm_group_channels=16, the
                       presets' default): torch's channels_last kernel vectorises over a group's channels
    GN, NCHW           the same GroupNorm on a contiguous (NCHW) copy of the activation, not counting
                       the copy: shows that torch's CPU kernel for channels_last is the slow part
    LN                 difflab's ChannelLayerNorm (model.norm=layer): LayerNorm over each pixel's
                       channels, one contiguous row per pixel in channels_last memory

One (64, 128, 32, 32) bf16 activation (the matched architecture's 32x32 level at batch 64), 32
groups, 2 threads, the variants alternated, medians of 7.

    python bench/norm_speed.py

Last line: ``group16_speedup=X layernorm_speedup=Y nchw_groupnorm_speedup=Z`` (GN's time over that of
GN with 16 channels per group, of LN, of GN on NCHW).
"""
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.models.layers import ChannelLayerNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave  # noqa: E402

N, C, H, GROUPS = 64, 128, 32, 32


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    x_cl = torch.randn(N, C, H, H, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy_cl = torch.randn(N, C, H, H, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    gn, gn16, ln = torch.nn.GroupNorm(GROUPS, C), torch.nn.GroupNorm(C // 16, C), ChannelLayerNorm(C)

    def run(norm, x0, dy):
        def step() -> None:
            x = x0.detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = F.silu(norm(x))
            y.backward(dy)
        return step

    variants = {
        "GN": run(gn, x_cl, dy_cl),
        "GN, 16 ch/group": run(gn16, x_cl, dy_cl),
        "GN, NCHW": run(gn, x_cl.contiguous(), dy_cl.contiguous()),
        "LN": run(ln, x_cl, dy_cl),
    }
    times = interleave(variants, rounds=7, per_round=1)
    print(f"norm + SiLU forward + backward on a ({N}, {C}, {H}, {H}) bf16 activation, torch {torch.__version__}")
    print("| variant | ms (median of 7) |")
    print("|---|---:|")
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    print(f"group16_speedup={med['GN'] / med['GN, 16 ch/group']:.2f} layernorm_speedup={med['GN'] / med['LN']:.2f} "
          f"nchw_groupnorm_speedup={med['GN'] / med['GN, NCHW']:.2f}")


if __name__ == "__main__":
    main()
