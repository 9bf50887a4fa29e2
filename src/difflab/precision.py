"""Which float type the network runs in: bf16 autocast where the hardware does bf16 natively.

Shared by training (bf16 autocast, fp32 master weights) and sampling (bf16 autocast of the network
call only; the sampler's own arithmetic stays fp32/fp64).
"""
from __future__ import annotations

import torch

from difflab.config import Precision


def cpu_has_fast_bf16() -> bool:
    """True where the CPU does bf16 math natively (AMX-BF16 or AVX512-BF16), so autocast pays.

    Read from the kernel's CPU flags (Linux); elsewhere assume not and stay in fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32."""
    if precision is Precision.FP32:
        return None
    if precision is Precision.BF16:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None
