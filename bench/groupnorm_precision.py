"""GroupNorm + SiLU forward and backward: as autocast runs it (group_norm is on autocast's fp32 list, so
bf16 activations are cast to fp32) against GroupNorm run in bf16 itself. One (64, 128, 32, 32)
channels_last activation, 32 groups, 2 threads, alternating, medians of 7.

    python bench/groupnorm_precision.py

Last line: ``bf16_groupnorm_speedup=X`` (autocast's time over bf16's).
"""
import statistics
import time

import torch


torch.set_num_threads(2)
x0 = torch.randn(64, 128, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
gn32 = torch.nn.GroupNorm(32, 128)
gn16 = torch.nn.GroupNorm(32, 128).to(torch.bfloat16)
def a():  # as under autocast: group_norm is on autocast's fp32 list, so bf16 in -> fp32 compute/out
    x = x0.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.silu(gn32(x))
    y.float().sum().backward()
def b():  # GroupNorm run in bf16 itself (no cast), SiLU in bf16
    x = x0.detach().requires_grad_()
    y = torch.nn.functional.silu(gn16(x))
    y.float().sum().backward()
res = {"autocast (fp32 GN)": [], "bf16 GN": []}
for f in (a, b):
    f()
for r in range(7):
    for k, f in zip(res, (a, b)):
        t0 = time.perf_counter()
        f()
        res[k].append(time.perf_counter() - t0)
for k, v in res.items():
    print(f"{k:20s} fwd+bwd GN+SiLU median {1000 * statistics.median(v):.1f} ms")
med = [statistics.median(v) for v in res.values()]
print(f"bf16_groupnorm_speedup={med[0] / med[1]:.2f}")
