"""What every sampler shares: the per-step callback record."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Step:
    """Handed to the callback after step ``i``: the state ``x`` at timestep ``t`` (noise level
    ``sigma``) the step started from, the denoiser's ``x0`` there, and the state ``x_next`` it
    moved to (x_next of the last step is the sample)."""

    i: int
    t: float
    sigma: float
    x: Tensor
    x0: Tensor
    x_next: Tensor


Callback = Callable[[Step], None] | None
