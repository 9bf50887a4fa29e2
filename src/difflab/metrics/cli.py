"""The ``eval`` and ``fid-stats`` subcommands, for ``difflab.cli`` to register.

``COMMANDS`` maps each name to (help, add_arguments(parser), run(args) -> exit code); the run
functions raise :class:`difflab.errors.DifflabError` subclasses for bad input.
"""
from __future__ import annotations

from typing import Callable

from difflab.metrics.evaluate import add_eval_arguments, add_fid_stats_arguments, run_eval, run_fid_stats

__all__ = ["COMMANDS"]

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "eval": ("FID, KID and anime-face detection rates of a folder of generated images",
             add_eval_arguments, run_eval),
    "fid-stats": ("precompute (and cache) the FID reference statistics of a folder of real images",
                  add_fid_stats_arguments, run_fid_stats),
}
