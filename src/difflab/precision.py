"""How the network runs fast: bf16 autocast where the hardware does bf16 natively, and whether
torch.compile can run here.

Shared by training (bf16 autocast, fp32 master weights) and sampling (bf16 autocast of the network
call only; the sampler's own arithmetic stays fp32/fp64).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from enum import Enum
from typing import TypeVar

import torch

from difflab.errors import ConfigError


class Precision(str, Enum):
    AUTO = "auto"  # bf16 where the CPU has native bf16 (AMX / AVX512-BF16) or the GPU does; fp16 on older GPUs; else fp32
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast, fp32 master weights and optimizer state
    FP16 = "fp16"  # fp16 autocast; training adds a gradient scaler (torch.amp.GradScaler)


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
    if precision is Precision.FP16:
        return torch.float16
    if device.type == "cuda":  # T4 / V100 / P100 have no bf16: fp16 with a gradient scaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast_context(device: torch.device | str | None, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``'s type (None: the CPU), or a disabled one (plain fp32) when
    ``dtype`` is None."""
    kind = torch.device(device if device is not None else "cpu").type
    return torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA switched on or off inside the block (both
    flags restored after); no effect off CUDA."""
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=enabled):
            yield
    finally:
        matmul.allow_tf32 = old


def fast_matmul(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """TF32 on for training on CUDA (Ampere and later; ignored before); nothing elsewhere."""
    return tf32(True) if device.type == "cuda" else contextlib.nullcontext()


def require_compiler(device: torch.device, flag: str) -> None:
    """torch.compile's CPU backend (inductor) builds C++ kernels: fail with one line naming ``flag``
    before any work if no compiler is there (inductor reads $CXX, else looks for g++ / clang++)."""
    if device.type == "cpu" and not any(shutil.which(c) for c in filter(None, [os.environ.get("CXX"), "g++", "clang++", "c++"])):
        raise ConfigError(f"{flag} needs a C++ compiler on PATH (g++ or clang++, or set CXX) for torch.compile on CPU")


M = TypeVar("M", bound=torch.nn.Module)


def to_memory_format(module: M, memory_format: torch.memory_format = torch.channels_last) -> M:
    """``module.to(memory_format=...)``: torch supports it, its type stubs do not list it."""
    return module.to(memory_format=memory_format)  # type: ignore[call-overload]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the old value after (None: as it is)."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
