"""What a test needs from outside the repository (shared data, weights, extras, a browser): missing on a
user's machine the test is skipped, saying what is missing and how to get it; under CI (``CI=true``), which
provides all of it, the test fails instead, so nothing is silently left out there."""
from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(what: str, hint: str = "", *, module_level: bool = False) -> NoReturn:
    """Skip (or, under CI, fail) a test because ``what`` is not available; ``hint`` says how to get it.
    ``module_level``: called while a test module is imported (skips the whole module)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs {what}, which is missing{': ' + hint if hint else ''}", pytrace=False)
    pytest.skip(f"{what} not available{' (' + hint + ')' if hint else ''}", allow_module_level=module_level)
