"""The noise schedule: everything that depends on beta_t and nothing that depends on a network.

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 4):

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,    abar_t = prod_{s<=t} (1 - beta_s)

Timesteps are 0-based: ``t = 0`` is the first noising step and ``t = T - 1`` the last, as in
improved-diffusion and diffusers. We also use the variance-exploding view of the same process
(Karras et al. 2022): ``sigma_t = sqrt((1 - abar_t) / abar_t)``, so that ``x_t / sqrt(abar_t) =
x_0 + sigma_t * eps``; samplers and grids speak sigma, and ``sigma = 0`` is the data end.

All tables are built once in float64 from the betas and kept in float64 (they are tiny: T
numbers each). Lookups cast to the dtype of the tensor they are applied to, so training and
sampling run in float32 or bf16 while the schedule itself never accumulates rounding error
(``cumprod`` in float32 drifts visibly at T = 1000).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from difflab.devices import to_device
from difflab.errors import ConfigError, parse_choice

F64 = torch.float64


class BetaSchedule(str, Enum):
    LINEAR = "linear"  # Ho et al. 2020
    COSINE = "cosine"  # Nichol & Dhariwal 2021, eq. 17
    QUADRATIC = "quadratic"  # linear in sqrt(beta) (DDPM code's "quad")
    SIGMOID = "sigmoid"  # sigmoid(linspace(-6, 6)) mapped onto [beta_start, beta_end]
    SIGMOID_ALPHABAR = "sigmoid-alphabar"  # Jabri et al. 2022, sigmoid schedule on abar


class VarianceType(str, Enum):
    """The two fixed reverse-process variances of Ho et al. 2020, section 3.2."""

    FIXED_SMALL = "fixed-small"  # posterior variance beta~_t (optimal for deterministic x_0)
    FIXED_LARGE = "fixed-large"  # beta_t (optimal for x_0 ~ N(0, I))


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything needed to rebuild a schedule.

    ``beta_start``/``beta_end`` are the DDPM values for T = 1000; the beta-range schedules
    (linear, quadratic, sigmoid) scale them by ``1000 / T`` so that other T trace the same
    abar curve (improved-diffusion does this for linear; we do it for all three so that T is
    a resolution, not a different process). ``cosine_s`` is the cosine offset; ``sigmoid_start``,
    ``sigmoid_end``, ``sigmoid_tau`` parametrise the abar-sigmoid schedule.

    ``betas``: explicit betas, one per timestep (an imported model's table, e.g. a diffusers scheduler's
    ``trained_betas``); when given they are the schedule, and ``kind`` and its parameters are unused.
    """

    kind: BetaSchedule = BetaSchedule.LINEAR
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    sigmoid_start: float = -3.0
    sigmoid_end: float = 3.0
    sigmoid_tau: float = 1.0
    max_beta: float = 0.999
    betas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_choice(BetaSchedule, self.kind, "noise schedule"))
        if not isinstance(self.timesteps, int) or self.timesteps < 1:
            raise ConfigError(f"schedule timesteps must be a positive integer, got {self.timesteps!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.betas and (len(self.betas) != self.timesteps or not all(
                isinstance(b, float) and 0 < b < 1 for b in self.betas)):
            raise ConfigError(f"schedule.betas must hold schedule.timesteps={self.timesteps} numbers in (0, 1), "
                              f"got {len(self.betas)}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}"
            )
        if self.beta_end * 1000 / self.timesteps >= 1 and self.kind in _BETA_RANGE_KINDS and not self.betas:
            raise ConfigError(
                f"timesteps={self.timesteps} is too few for a {self.kind.value} schedule: "
                f"beta_end scaled by 1000/T reaches {self.beta_end * 1000 / self.timesteps:.3g} >= 1"
            )
        if self.sigmoid_tau <= 0 or self.sigmoid_start >= self.sigmoid_end:
            raise ConfigError("sigmoid-alphabar needs sigmoid_start < sigmoid_end and sigmoid_tau > 0")
        if not 0 < self.max_beta < 1:
            raise ConfigError(f"max_beta must be in (0, 1), got {self.max_beta}")



_BETA_RANGE_KINDS = (BetaSchedule.LINEAR, BetaSchedule.QUADRATIC, BetaSchedule.SIGMOID)


def _betas_from_alpha_bar(alpha_bar: Tensor, max_beta: float) -> Tensor:
    """beta_i = 1 - abar(i+1)/abar(i) for a continuous abar sampled at i = 0..T, clipped."""
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(cfg: ScheduleConfig) -> Tensor:
    """The betas of ``cfg`` as a float64 tensor of length T."""
    if cfg.betas:
        return torch.tensor(cfg.betas, dtype=F64)
    T = cfg.timesteps
    scale = 1000.0 / T
    lo, hi = cfg.beta_start * scale, cfg.beta_end * scale
    if cfg.kind is BetaSchedule.LINEAR:
        return torch.linspace(lo, hi, T, dtype=F64)
    if cfg.kind is BetaSchedule.QUADRATIC:
        return torch.linspace(math.sqrt(lo), math.sqrt(hi), T, dtype=F64) ** 2
    if cfg.kind is BetaSchedule.SIGMOID:
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64)) * (hi - lo) + lo
    u = torch.linspace(0, 1, T + 1, dtype=F64)  # continuous time t/T at i = 0..T
    if cfg.kind is BetaSchedule.COSINE:
        s = cfg.cosine_s
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return _betas_from_alpha_bar(f / f[0], cfg.max_beta)
    # SIGMOID_ALPHABAR: Jabri et al. 2022 ("Scalable Adaptive Computation for Iterative
    # Generation"), gamma(t) = (-sigmoid((t (end - start) + start) / tau) + v_end) / (v_end - v_start).
    start, end, tau = cfg.sigmoid_start, cfg.sigmoid_end, cfg.sigmoid_tau
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau, dtype=F64)), torch.sigmoid(torch.tensor(end / tau, dtype=F64))
    gamma = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(gamma.clamp(min=0.0), cfg.max_beta)


def _gather(table: Tensor, t: Tensor | int | float, like: Tensor) -> Tensor:
    """``table[t]`` for integer t, shaped to broadcast against ``like`` (B, 1, 1, ...) in its dtype."""
    t = torch.as_tensor(t, device=table.device)
    out = table[t.long()]
    out = out.reshape(out.shape + (1,) * (like.ndim - out.ndim)) if out.ndim else out
    return to_device(out, like.device, like.dtype)


def broadcast_to(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example (B,) or scalar tensor to broadcast against ``like``, in its dtype."""
    v = torch.as_tensor(v)
    if v.ndim:
        v = v.reshape(v.shape + (1,) * (like.ndim - v.ndim))
    return to_device(v, like.device, like.dtype)


Num = float | Tensor  # the posterior formula serves Python floats and float64 tables alike


class Posterior(NamedTuple):
    """q(x_s | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, variance) for two noise levels abar_s > abar_t."""

    coef_x0: Num
    coef_xt: Num
    variance: Num  # beta~: the posterior variance (DDPM's fixed-small reverse variance)
    beta: Num  # 1 - abar_t / abar_s: the step's beta (DDPM's fixed-large reverse variance)

    def reverse_variance(self, kind: VarianceType) -> Num:
        """The reverse-process variance of Ho et al. 2020, sec. 3.2, for this step."""
        return self.variance if kind is VarianceType.FIXED_SMALL else self.beta


def posterior(abar_t: Num, abar_s: Num) -> Posterior:
    """The forward process's posterior for the step from abar_t down to abar_s (floats or tensors).

    Ho et al. 2020, eqs. 6-7, written for any pair of noise levels, so that one formula serves the
    schedule's own tables (abar_s = abar_{t-1}), a respaced grid (abar_s = the next kept level) and a
    fractional one: with beta = 1 - abar_t / abar_s,
        coef_x0 = sqrt(abar_s) beta / (1 - abar_t),  coef_xt = sqrt(1 - beta) (1 - abar_s) / (1 - abar_t),
        variance = beta (1 - abar_s) / (1 - abar_t).
    At abar_s = 1 (the step to data) the mean is x_0 and the variance 0.
    """
    beta = 1 - abar_t / abar_s
    return Posterior(
        coef_x0=abar_s**0.5 * beta / (1 - abar_t),
        coef_xt=(1 - beta) ** 0.5 * (1 - abar_s) / (1 - abar_t),
        variance=beta * (1 - abar_s) / (1 - abar_t),
        beta=beta,
    )


class NoiseSchedule:
    """A discrete diffusion schedule of T steps, with every derived table in float64.

    Build it from a config (``NoiseSchedule(ScheduleConfig(...))`` or
    ``NoiseSchedule.from_name("cosine", 1000)``) or from explicit betas
    (``NoiseSchedule.from_betas``). ``timestep_map[i]`` is the original training timestep of step
    i: the identity for a fresh schedule, the kept timesteps for a respaced one, whose ``base`` is the
    schedule the network was trained on (:meth:`training_time` maps its steps back there).
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        self.base: NoiseSchedule = self
        self._build(make_betas(self.config), torch.arange(self.config.timesteps, dtype=F64))

    @classmethod
    def from_name(cls, kind: str | BetaSchedule, timesteps: int = 1000, **kwargs) -> NoiseSchedule:
        return cls(ScheduleConfig(kind=parse_choice(BetaSchedule, kind, "noise schedule"), timesteps=timesteps, **kwargs))

    @classmethod
    def from_betas(cls, betas: Tensor, timestep_map: Tensor | None = None, config: ScheduleConfig | None = None) -> NoiseSchedule:
        self = cls.__new__(cls)
        self.config = config or ScheduleConfig(timesteps=len(betas))
        self.base = self
        betas = torch.as_tensor(betas, dtype=F64)
        tmap = torch.arange(len(betas), dtype=F64) if timestep_map is None else torch.as_tensor(timestep_map, dtype=F64)
        self._build(betas, tmap)
        return self

    def _build(self, betas: Tensor, timestep_map: Tensor) -> None:
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("betas must be a non-empty 1-D sequence in (0, 1)")
        self.num_timesteps = len(betas)
        self.timestep_map = timestep_map
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=F64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self.sigmas = (1 / self.snr).sqrt()  # VE noise level: x_t / sqrt(abar) = x_0 + sigma eps
        self.log_sigmas = self.sigmas.log()
        # Posterior q(x_{t-1} | x_t, x_0) at every t (Ho et al. eqs. 6-7); at t = 0 the "previous"
        # level is the data (abar = 1): mean x_0, variance 0.
        post = posterior(self.alphas_cumprod, self.alphas_cumprod_prev)
        self.posterior_mean_coef1, self.posterior_mean_coef2 = post.coef_x0, post.coef_xt
        self.posterior_variance = post.variance

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({'explicit' if self.config.betas else self.config.kind.value}, T={self.num_timesteps})"

    # -- the forward process -------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise; ``t`` is an integer tensor of shape (B,)."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    # -- continuous-time lookups (fractional t, for ODE-solver grids) ---------------------
    def sigma_at(self, t: Tensor | float) -> Tensor:
        """sigma at a possibly fractional timestep, interpolating log-sigma linearly between
        integer steps (k-diffusion's ``DiscreteSchedule.t_to_sigma``); the table's own value at integers."""
        t = torch.as_tensor(t, dtype=F64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo
        between = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        return torch.where(w == 0, self.sigmas[lo], between)

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        """abar at a possibly fractional timestep (float64), consistent with :meth:`sigma_at`; the
        table's own value at integers."""
        t = torch.as_tensor(t, dtype=F64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        return torch.where(t == lo, self.alphas_cumprod[lo], 1 / (1 + self.sigma_at(t) ** 2))

    def training_time(self, t: Tensor | float) -> Tensor:
        """The timestep of :attr:`base` (the network's training schedule) that step ``t`` of this
        schedule stands for, as float64: ``t`` itself for a fresh schedule; ``timestep_map[t]`` at the
        integer steps of a respaced one, and between them the training time with the same noise level."""
        t = torch.as_tensor(t, dtype=F64)
        if self.base is self:
            return t
        idx = t.round().clamp(0, self.num_timesteps - 1).long()
        between = self.base.t_at_sigma(self.sigma_at(t))
        return torch.where(t == idx, self.timestep_map[idx], between)

    def t_at_sigma(self, sigma: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_at`: the fractional timestep whose sigma is ``sigma`` (clamped)."""
        log_sigma = torch.as_tensor(sigma, dtype=F64).log()
        ls = self.log_sigmas
        idx = torch.searchsorted(ls, log_sigma.clamp(ls[0], ls[-1]).reshape(-1)).clamp(1, len(ls) - 1)
        lo_v, hi_v = ls[idx - 1], ls[idx]
        w = ((log_sigma.reshape(-1) - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        return ((idx - 1).to(F64) + w).reshape(log_sigma.shape)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- respacing ------------------------------------------------------------------------
    def respace(self, timesteps: Sequence[int] | Tensor) -> NoiseSchedule:
        """A shorter schedule that visits only ``timesteps`` (of this schedule).

        Its abar at step i equals this schedule's abar at ``timesteps[i]``, and its betas are
        rebuilt from those: beta'_i = 1 - abar[k_i] / abar[k_{i-1}] (improved-diffusion
        ``respace.py``). ``timestep_map`` maps each new step back to the original training
        timestep, which is what the network must be given.
        """
        kept = torch.as_tensor(list(timesteps) if not isinstance(timesteps, Tensor) else timesteps).long()
        kept = torch.unique(kept)  # sorted ascending, duplicates removed
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ConfigError(f"respacing needs timesteps in [0, {self.num_timesteps - 1}]")
        abar = self.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
        respaced = NoiseSchedule.from_betas(1 - abar / prev, self.timestep_map[kept], self.config)
        respaced.base = self.base
        return respaced
