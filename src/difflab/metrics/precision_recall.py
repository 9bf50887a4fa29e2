"""Improved precision and recall (Kynkaanniemi et al. 2019) on Inception features.

FID mixes two failures into one number: images that look wrong (low *precision*) and a model that
covers only part of the data (low *recall*, e.g. a GAN's mode collapse). Each set of features
approximates its manifold by the union of balls around its points, the radius of each being the
distance to its k-th nearest neighbour within the same set (k = 3 in the paper). Then

* precision = the fraction of generated points inside the real manifold (some real ball holds them),
* recall    = the fraction of real points inside the generated manifold.

Written here (40 lines on torch) rather than taken from the ``prdc`` package, which would bring
scikit-learn in for one nearest-neighbour search. Distances are computed in float64, in blocks, so
10k x 10k sets need no more than a few hundred MiB.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difflab.errors import ConfigError

__all__ = ["PrecisionRecall", "knn_radii", "manifold_coverage", "precision_recall"]

_BLOCK = 2048


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def _as_tensor(x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.ndim != 2 or len(t) < 2 or not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{what}: need a finite (N >= 2) x D feature matrix, got shape {tuple(t.shape)}")
    return t


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), _BLOCK):
        d = torch.cdist(x[i:i + _BLOCK], x)
        # the point itself is at distance 0 and is the 1st "neighbour": take the (k+1)-th smallest
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def manifold_coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` within radii[j] of some manifold[j] (boundary included)."""
    inside = []
    for i in range(0, len(points), _BLOCK):
        d = torch.cdist(points[i:i + _BLOCK], manifold)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall of ``fake`` against ``real`` (rows are feature vectors)."""
    r, f = _as_tensor(real, "real features"), _as_tensor(fake, "generated features")
    if r.shape[1] != f.shape[1]:
        raise ConfigError(f"real and generated features differ in width ({r.shape[1]} vs {f.shape[1]})")
    if not 1 <= k < min(len(r), len(f)):
        raise ConfigError(f"precision/recall k must be in [1, {min(len(r), len(f)) - 1}], got {k}")
    precision = manifold_coverage(f, r, knn_radii(r, k))
    recall = manifold_coverage(r, f, knn_radii(f, k))
    return PrecisionRecall(precision=precision, recall=recall, k=k)
