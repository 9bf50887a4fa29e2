"""Shared fixtures.

Real data lives in ``../shared/data`` beside the checkout (see its README). Tests that need
it skip on a user's machine, but fail under CI (``CI=true``) when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the shared data set {path}, which is missing")
        pytest.skip(f"shared data {path} not present on this machine")
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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own difflab cache, so tests never read a stale user cache."""
    cache = tmp_path_factory.getbasetemp() / "difflab-cache"
    monkeypatch.setenv("DIFFLAB_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
