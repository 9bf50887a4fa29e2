"""Which device a command runs its network on: ``--device auto|cpu|cuda|cuda:N|mps``.

``auto`` is CUDA when torch sees a CUDA GPU, else Apple's MPS when available, else the CPU. Asking for
a device that is not there is a one-line error naming the flag. Seeds do not depend on the device
(:mod:`difflab.samplers.noise` draws on the CPU and moves the noise).
"""
from __future__ import annotations

import re

import torch

from difflab.errors import ConfigError

DEVICE_HELP = "device for the network: auto (CUDA, else MPS, else CPU; default), cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """The torch device ``spec`` names (see the module docstring); checked, one-line errors."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ConfigError(f"{flag} mps: this torch has no usable MPS device (Apple silicon only)")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise ConfigError(f"{flag} must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag} {text}: no CUDA GPU is visible to torch here (torch.cuda.is_available() is False)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {text}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 ...)")
    return torch.device(text)


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (a CPU tensor) on ``device`` in ``dtype``, without making the host wait for a GPU.

    A copy from ordinary (pageable) CPU memory to CUDA returns only once it has run, after every
    kernel queued before it: a host sync. From pinned memory it is queued like a kernel
    (``non_blocking``); torch's caching host allocator keeps the pinned block until the copy is
    done. The dtype is converted on the CPU first (float64 tables never travel). Elsewhere this is
    ``x.to(device, dtype)``."""
    if dtype is not None:
        x = x.to(dtype=dtype)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
