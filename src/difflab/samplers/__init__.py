"""Samplers: pure functions of (denoiser, x, grid, generator, callback), one table that names them
(:mod:`~difflab.samplers.registry`), and the driver that turns a trained denoiser into N images with
one seed per image (:mod:`~difflab.samplers.run`).

Modules: ``grid`` (float64 step grids), ``noise`` (per-image generators), ``ve`` (the variance-
exploding variable the ODE/SDE solvers integrate in), one module per sampler family (``ddpm``,
``ddim``, ``karras`` for Euler/Heun, ``dpmpp``), ``registry`` and ``run``.
"""
from __future__ import annotations

from difflab.samplers.base import Step
from difflab.samplers.ddim import sample_ddim
from difflab.samplers.ddpm import sample_ddpm
from difflab.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from difflab.samplers.euler import sample_euler
from difflab.samplers.grid import (
    Grid,
    GridKind,
    Spacing,
    build_grid,
    discrete_grid,
    karras_sigmas,
    log_snr_sigmas,
    sigma_grid,
    spaced_timesteps,
)
from difflab.samplers.heun import sample_heun
from difflab.samplers.noise import image_generators, image_seed
from difflab.samplers.registry import SAMPLERS, SamplerEntry, SamplerKind, nfe
from difflab.samplers.run import SamplerConfig, make_grid, run_sampler, sample, sample_batches, start_timestep

__all__ = [
    "Grid", "GridKind", "SAMPLERS", "SamplerConfig", "SamplerEntry", "SamplerKind", "Spacing", "Step", "build_grid",
    "discrete_grid", "image_generators", "image_seed", "karras_sigmas", "log_snr_sigmas", "make_grid", "nfe",
    "run_sampler", "sample", "sample_batches", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m", "sample_euler", "sample_heun", "sigma_grid", "spaced_timesteps", "start_timestep",
]
