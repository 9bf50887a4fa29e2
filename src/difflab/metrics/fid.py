"""Frechet distance between Gaussians fitted to feature sets (FID when the features are Inception's).

    FD^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2)

(Frechet/Wasserstein-2 distance of two Gaussians; Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium", eq. 6.) Everything is float64.

Why not ``scipy.linalg.sqrtm``: pytorch-fid and clean-fid compute ``sqrtm(S1 @ S2)`` of a
non-symmetric product, which can come back complex or non-finite; their "usual fix" then adds
``eps * I`` to both covariances and drops small imaginary parts. Only the *trace* of the root is
needed, and that has an exact symmetric form: the eigenvalues of ``S1 S2`` equal those of
``R S2 R`` with ``R = sqrt(S1)`` (eig(AB) = eig(BA) for square A, B, with A = R and
B = R S2), and ``R S2 R`` is symmetric positive semi-definite, so

    Tr sqrt(S1 S2) = sum_i sqrt(lambda_i(R S2 R)),   R = V diag(sqrt(w)) V^T  from eigh(S1).

Two ``eigh`` calls of symmetric matrices (LAPACK's most robust eigensolver), no complex
numbers, no inverse, valid for singular covariances (the usual case: 1000 images give a rank
<= 999 covariance in 2048 dimensions). The stability fix is the matching one for this form:
eigenvalues that rounding pushes slightly below zero (of S1, and of R S2 R) are set to 0 before
the square root. So scipy is not needed, and difflab does not depend on it.

When one side is given as features with n <= d vectors (the generated side of an eval), the
trace term is computed from an n x n matrix instead (:func:`trace_sqrt_product_lowrank`). The
float64 linear algebra runs in torch (MKL LAPACK/BLAS), which is several times faster here than
numpy's bundled OpenBLAS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difflab.errors import DataError
from difflab.precision import torch_threads

__all__ = [
    "GaussianStats", "fid_from_features", "frechet_distance", "gaussian_stats", "trace_sqrt_product",
    "trace_sqrt_product_lowrank",
]


@dataclass(frozen=True)
class GaussianStats:
    """Mean (d,) and covariance (d, d), float64, of ``n`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_stats(features: np.ndarray, what: str = "features") -> GaussianStats:
    """Mean and unbiased covariance (``np.cov`` convention, ddof=1) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise DataError(f"{what}: expected an N x D feature matrix, got shape {f.shape}")
    if f.shape[0] < 2:
        raise DataError(f"{what}: need at least 2 images for a covariance, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise DataError(f"{what}: features contain NaN or infinity")
    t = torch.from_numpy(f)
    mu = t.mean(0)
    c = t - mu
    sigma = (c.T @ c) / (f.shape[0] - 1)
    return GaussianStats(mu.numpy(), sigma.numpy(), int(f.shape[0]))


def _check(mu: np.ndarray, sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{what}: mean of shape {mu.shape} does not match covariance of shape {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise DataError(f"{what}: statistics contain NaN or infinity")
    return mu, (sigma + sigma.T) / 2.0


# _EIGH_THREADS: torch's symmetric eigensolvers (MKL LAPACK) run on one thread here. With two
# threads on this 2-core machine, eigvalsh of a 1000 x 1000 matrix took 24 s instead of 0.3 s
# while another process was busy (bench/eval_speed.py, BENCHMARKS.md); the matrix products
# around them keep torch's thread setting.


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr sqrt(S1 S2)`` for symmetric PSD ``S1``, ``S2`` (see the module docstring)."""
    s1, s2 = _t(sigma1), _t(sigma2)
    with torch_threads(1):  # see _EIGH_THREADS
        w, v = torch.linalg.eigh((s1 + s1.T) / 2.0)
    r = (v * w.clamp_min(0.0).sqrt()) @ v.T  # sqrt(S1)
    m = r @ s2 @ r
    with torch_threads(1):
        lam = torch.linalg.eigvalsh((m + m.T) / 2.0)
    return float(lam.clamp_min(0.0).sqrt().sum())


def trace_sqrt_product_lowrank(features1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr sqrt(S1 S2)`` where ``S1`` is the covariance of the n x d ``features1``.

    With ``A`` the centred features scaled by ``1/sqrt(n-1)``, ``S1 = A^T A`` and the nonzero
    eigenvalues of ``S1 S2 = A^T (A S2)`` are those of ``A S2 A^T`` (eig(XY) = eig(YX) again),
    a symmetric PSD n x n matrix. For n < d (1000 generated images, d = 2048) this is one small
    ``eigvalsh`` instead of two d x d ``eigh``: ~0.2 s instead of several seconds, same value.
    """
    f = _t(features1)
    a = (f - f.mean(0)) / float(np.sqrt(f.shape[0] - 1))
    m = a @ _t(sigma2) @ a.T
    with torch_threads(1):  # see _EIGH_THREADS
        lam = torch.linalg.eigvalsh((m + m.T) / 2.0)
    return float(lam.clamp_min(0.0).sqrt().sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, sigma1 = _check(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise DataError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    tr = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)


def fid_from_features(a: np.ndarray | GaussianStats, b: np.ndarray | GaussianStats) -> float:
    """Frechet distance between two feature sets (N x d arrays) or their precomputed statistics.

    When a side is given as features with fewer vectors than dimensions, the trace term uses
    :func:`trace_sqrt_product_lowrank` on it (exactly the same quantity, much faster).
    """
    sa = a if isinstance(a, GaussianStats) else gaussian_stats(a, "first feature set")
    sb = b if isinstance(b, GaussianStats) else gaussian_stats(b, "second feature set")
    if sa.mu.shape != sb.mu.shape:
        raise DataError(f"feature dimensions differ: {sa.mu.shape[0]} vs {sb.mu.shape[0]}")
    _check(sa.mu, sa.sigma, "first statistics")
    _check(sb.mu, sb.sigma, "second statistics")
    d = sa.mu.shape[0]
    low = [(x, other) for x, s, other in ((a, sa, sb), (b, sb, sa)) if not isinstance(x, GaussianStats) and s.n <= d]
    if not low:
        return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    feats, other = min(low, key=lambda p: len(p[0]))
    diff = sa.mu - sb.mu
    tr = trace_sqrt_product_lowrank(np.asarray(feats, dtype=np.float64), (other.sigma + other.sigma.T) / 2.0)
    return float(diff @ diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2.0 * tr)
