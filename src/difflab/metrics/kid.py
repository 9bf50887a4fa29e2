"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 4 and app. A).

KID is the squared maximum mean discrepancy between the real and generated feature
distributions under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,      d = feature dimension (2048),

estimated without bias on random subsets and averaged: for each of ``subsets`` draws of
``m = min(n_real, n_fake, subset_size)`` real features X and m generated features Y (each drawn
without replacement),

    MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
              - 2/m^2 sum_{i,j} k(x_i, y_j).

The result is the mean of these estimates and their standard deviation (population, ddof=0,
as clean-fid reports it). Defaults (100 subsets of at most 1000) are those of StyleGAN2/3's
``kernel_inception_distance.py`` and clean-fid. Unlike FID, the estimator is unbiased, so KID
at 1000 samples is comparable with KID at 50k; its expectation is 0 for one distribution, and
single estimates can be slightly negative.

The kernel sums are float64 matrix products in torch; a side of at most 4096 vectors has its
kernel matrix computed once and indexed, so 100 subsets of 1000 take seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.errors import ConfigError, DataError

__all__ = ["KIDResult", "kid", "mmd2_unbiased", "polynomial_kernel"]


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """``(x y^T / d + coef0) ** degree`` with d the feature dimension."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def _mmd2(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    m = kxx.shape[0]
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two equal-size samples under the cubic polynomial kernel."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise DataError(f"MMD needs two samples of one size >= 2, got {x.shape[0]} and {y.shape[0]}")
    return _mmd2(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


#: A side with at most this many vectors gets its kernel matrix computed once (<= 128 MiB).
_PRECOMPUTE = 4096


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, progress: bool = False) -> KIDResult:
    """KID between two feature sets (N x d each); ``seed`` fixes the subset draws."""
    for name, v in (("kid subsets", subsets), ("kid subset size", subset_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    r = torch.from_numpy(np.asarray(real, dtype=np.float64))
    f = torch.from_numpy(np.asarray(fake, dtype=np.float64))
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise DataError(f"KID needs two N x d feature sets of one d, got {tuple(r.shape)} and {tuple(f.shape)}")
    m = min(r.shape[0], f.shape[0], int(subset_size))
    if m < 2:
        raise DataError(f"KID needs at least 2 images on each side, got {r.shape[0]} real and {f.shape[0]} generated")
    rng = np.random.default_rng(seed)
    kr = polynomial_kernel(r, r) if r.shape[0] <= _PRECOMPUTE else None
    kf = polynomial_kernel(f, f) if f.shape[0] <= _PRECOMPUTE else None
    vals = np.empty(int(subsets))
    for s in tqdm(range(int(subsets)), desc="kid", unit="subset", disable=not progress, dynamic_ncols=True):
        xi = torch.from_numpy(rng.choice(r.shape[0], m, replace=False))
        yi = torch.from_numpy(rng.choice(f.shape[0], m, replace=False))
        x, y = r[xi], f[yi]
        kxx = kr[xi][:, xi] if kr is not None else polynomial_kernel(x, x)
        kyy = kf[yi][:, yi] if kf is not None else polynomial_kernel(y, y)
        vals[s] = _mmd2(kxx, kyy, polynomial_kernel(x, y))
    return KIDResult(float(vals.mean()), float(vals.std()), int(subsets), m)
