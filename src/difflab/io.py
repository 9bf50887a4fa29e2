"""Crash-safe file writing and the user cache directory.

Every file difflab writes that a user may care about (checkpoints, configs, caches)
goes through :func:`atomic_write`: the data is written to a temporary file in the same
directory, flushed and fsync'ed, then renamed over the target. A crash at any point
leaves either the old file or the new one, never a torn mix.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from difflab.errors import OutputError


def cache_dir(*parts: str) -> Path:
    """``$DIFFLAB_CACHE`` or ``$XDG_CACHE_HOME/difflab`` or ``~/.cache/difflab``, plus ``parts``; created."""
    root = os.environ.get("DIFFLAB_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "difflab")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# what a failing write looks like (the body of atomic_path may also read or download: those errors pass)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over ``target``.

    On any exception the temporary file is removed and ``target`` is untouched. A failing write
    becomes one :class:`~difflab.errors.OutputError` naming ``target``: any ``OSError`` of creating,
    syncing or renaming the file (ENOSPC, EFBIG, EACCES, EROFS, ...), and the body's own ``OSError``
    when it is a full disk, a file size limit, a quota or a read-only file system; the body's other
    errors (a download that fails, a file it reads) pass unchanged.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputError(f"could not write {target}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as e:
            if e.errno in _WRITE_ERRNOS:
                raise OutputError(f"could not write {target}: {e.strerror or e}") from None
            raise
        try:
            # mkstemp creates 0600 files; give the result the permissions a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, target)
            fsync_dir(target.parent)
        except OSError as e:  # no permission, read-only, full: one line, target untouched
            raise OutputError(f"could not write {target}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path``, an existing file or folder, for the block.

    Processes that lock the same path take turns; the lock belongs to the open file, so a process that
    dies releases it. Locking a folder itself needs no lock file beside it. Where ``fcntl`` is missing
    (Windows), or the file system cannot lock (some network file systems), the block runs unlocked,
    the latter with a :class:`~difflab.errors.DifflabWarning`.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                raise
            import warnings

            from difflab.errors import DifflabWarning

            warnings.warn(f"cannot lock {path} ({e.strerror or e}): processes writing it at the same time are not "
                          "kept apart", DifflabWarning, stacklevel=3)
        yield
    finally:
        os.close(fd)  # releases the lock


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
