"""Errors a user can cause, and the one helper that checks option names.

Anything raised as a :class:`DifflabError` is reported by the CLI as a single line
(``difflab: error: ...``) with exit status 2, never as a traceback; a :class:`DifflabWarning` as
``difflab: warning: ...``.
"""
from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class DifflabError(Exception):
    """A problem with the user's input: bad flag, bad file, bad config."""


class ConfigError(DifflabError):
    """An option or config value is invalid."""


class DataError(DifflabError):
    """A data path is missing, empty or unreadable."""


class CheckpointError(DifflabError):
    """A run directory or checkpoint is missing or damaged."""


class OutputError(DifflabError):
    """A file could not be written (disk full, file too large, no permission, read-only file system)."""


class DifflabWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


def parse_choice(enum_cls: type[E], value: object, what: str) -> E:
    """Return ``enum_cls(value)``, or raise ConfigError naming ``what`` and the valid choices."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"unknown {what} {value!r}; choose one of {choices}") from None
