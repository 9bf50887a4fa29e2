"""The one table of samplers: kind -> (function, default grid, network evaluations, options, default steps).

| sampler          | method                                              | order | NFE for N steps |
| ---------------- | --------------------------------------------------- | ----- | --------------- |
| ``ddpm``         | ancestral (Ho et al. 2020, Alg. 2), any grid        | SDE   | N               |
| ``ddim``         | DDIM (Song et al. 2021), eta in [0, 1]              | 1     | N               |
| ``euler``        | Euler on the PF-ODE (Karras et al. 2022, Alg. 2)    | 1     | N               |
| ``heun``         | Heun (Karras et al. 2022, Alg. 1; churn: Alg. 2)    | 2     | 2N - 1          |
| ``dpmpp-2m``     | DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)           | 2     | N               |
| ``dpmpp-2m-sde`` | SDE-DPM-Solver++(2M)                                | SDE   | N               |
| ``dpmpp-3m``     | DPM-Solver++(3M)                                    | 3     | N               |
| ``dpmpp-3m-sde`` | SDE-DPM-Solver++(3M)                                | SDE   | N               |

Every sampler is a pure function ``fn(denoiser, x, grid, *, generator, callback, **options, **cond)``
from the VP state at grid.t[0] down to data; every grid ends with a step to sigma = 0. Adding a
sampler = its function and one :class:`SamplerKind` member with its :data:`SAMPLERS` row here.

Default grids: the classic integer grid for DDPM and DDIM, Karras et al.'s rho = 7 sigmas for their
Euler and Heun samplers, and even steps in log-SNR for DPM-Solver++, whose step size h is the
log-SNR step (tests/test_samplers_fast.py measures every sampler on every grid).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from difflab.errors import parse_choice
from difflab.samplers.ddim import sample_ddim
from difflab.samplers.ddpm import sample_ddpm
from difflab.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m, sample_dpmpp_3m_sde
from difflab.samplers.euler import sample_euler
from difflab.samplers.grid import GridKind
from difflab.samplers.heun import sample_heun

# the SamplerConfig fields a sampler may take as keyword options
Option = Literal["eta", "churn", "variance"]


class SamplerKind(str, Enum):
    DDPM = "ddpm"
    DDIM = "ddim"
    EULER = "euler"
    HEUN = "heun"
    DPMPP_2M = "dpmpp-2m"
    DPMPP_2M_SDE = "dpmpp-2m-sde"
    DPMPP_3M = "dpmpp-3m"
    DPMPP_3M_SDE = "dpmpp-3m-sde"


def _one_per_step(steps: int) -> int:
    return steps


def _heun_nfe(steps: int) -> int:
    return 2 * steps - 1  # the last step, to sigma = 0, has no second stage


@dataclass(frozen=True)
class SamplerEntry:
    """``fn`` and what the rest of difflab needs to know about it: its default ``grid``, ``nfe(N)``
    (network evaluations for N steps), the SamplerConfig ``options`` it takes, and ``default_steps``
    (None = one step per training timestep)."""

    fn: Callable[..., Any]
    grid: GridKind
    nfe: Callable[[int], int] = _one_per_step
    options: tuple[Option, ...] = ()
    default_steps: int | None = 50


SAMPLERS: dict[SamplerKind, SamplerEntry] = {
    SamplerKind.DDPM: SamplerEntry(sample_ddpm, GridKind.UNIFORM, options=("variance",), default_steps=None),
    SamplerKind.DDIM: SamplerEntry(sample_ddim, GridKind.UNIFORM, options=("eta",)),
    SamplerKind.EULER: SamplerEntry(sample_euler, GridKind.KARRAS, options=("churn",)),
    SamplerKind.HEUN: SamplerEntry(sample_heun, GridKind.KARRAS, nfe=_heun_nfe, options=("churn",)),
    SamplerKind.DPMPP_2M: SamplerEntry(sample_dpmpp_2m, GridKind.LOG_SNR),
    SamplerKind.DPMPP_2M_SDE: SamplerEntry(sample_dpmpp_2m_sde, GridKind.LOG_SNR),
    SamplerKind.DPMPP_3M: SamplerEntry(sample_dpmpp_3m, GridKind.LOG_SNR),
    SamplerKind.DPMPP_3M_SDE: SamplerEntry(sample_dpmpp_3m_sde, GridKind.LOG_SNR),
}


def samplers_taking(option: Option) -> list[SamplerKind]:
    """The samplers that take ``option``, in table order."""
    return [kind for kind, entry in SAMPLERS.items() if option in entry.options]


def nfe(sampler: SamplerKind | str, steps: int) -> int:
    """Network evaluations that ``steps`` steps of ``sampler`` cost."""
    return SAMPLERS[parse_choice(SamplerKind, sampler, "sampler")].nfe(steps)
