"""Per-image randomness: each image owns a generator, so an image depends on its seed only.

A sampler receives ``generator`` as None (torch's default generator), one ``torch.Generator`` for
the whole batch, or a sequence of generators, one per image. With one generator per image, image k
draws its initial noise and every later step's noise from its own stream, so the same seed gives
the same image whatever the batch size or the batch it lands in.

Per-image generators live on the CPU (:func:`image_generators`) and :func:`randn` draws there and
then moves the noise to the tensor's device, so a seed gives the same noise on a CPU, a CUDA GPU or
MPS: images then differ only by the devices' floating-point arithmetic.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from difflab.devices import to_device

Generators = torch.Generator | Sequence[torch.Generator] | None


def image_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for image ``index`` of a run with base ``seed``; ``stream`` > 0 gives
    the image independent streams for later stages (e.g. 1: the super-resolution stage of a cascade)."""
    key = [int(seed), int(index)] + ([int(stream)] if stream else [])
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_generators(seed: int, indices: Sequence[int], stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per image index (see the module docstring)."""
    return [torch.Generator().manual_seed(image_seed(seed, i, stream)) for i in indices]


def randn(shape: Sequence[int], generator: Generators, *, dtype=torch.float32, device="cpu") -> Tensor:
    """Standard normal noise of ``shape`` (batch first) drawn from ``generator`` on the generator's
    own device, then moved to ``device``, as described above."""
    if generator is None:
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return to_device(torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device),
                         torch.device(device))
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator])
    return to_device(noise, torch.device(device))


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)
