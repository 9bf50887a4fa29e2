"""Conditional accuracy: do generated images show the condition they were asked for?

A compact CNN (:class:`LabelClassifier`) is trained once on the labelled real training images
(:func:`train_classifier`), cached (:func:`~difflab.metrics.classifier_cache.classifier_for`, with
the cache's files and rules), and applied to generated images: :meth:`TrainedClassifier.accuracy`
reports, per attribute, the share of images whose predicted class is the requested one, and under
``"all"`` the share of images right on every requested attribute. Its own held-out accuracy
(``val_accuracy``) is the ceiling to read those figures against: a generator cannot score much
above the judge's accuracy on real images.

Protocol. Images (uint8 N x C x H x W, H = W) are converted to the classifier's channels (gray to
RGB by repeating, RGB to gray by ITU-R 601-2 luma, as Pillow's ``"L"``), resized to
``image_size`` (bilinear, antialiased, in float: no rounding) and scaled to [-1, 1]. The network is
three stages of (3x3 conv, BatchNorm, ReLU) x 2, 2x2 max-pooling between stages (widths w, 2w, 4w),
a global average pool and one linear head per attribute; trained with the sum of the heads'
cross-entropies, AdamW (weight decay 0.01), a 2 % linear warm-up then cosine decay to zero, random
horizontal flips, bf16 autocast where :func:`difflab.precision.autocast_dtype` says it pays, and
channels_last. The held-out split is a seeded permutation of *groups* (by default each image is
its own group): images sharing a group id, such as a face and its mirror image, stay on the same
side, otherwise the held-out figure measures memory rather than generalisation. Every random
choice (split, initial weights, batch order, flips) follows from ``config.seed``: the same data and
config give identical weights.

Measured 2026-12-04 on the project machine (2 vCPU AMD EPYC Zen 4 with AVX512-BF16, no GPU, torch
2.13.0+cpu, so bf16 autocast), default config apart from image_size/channels, by
``.venv/bin/python /tmp/acc/measure.py all`` run from the checkout (a script kept outside the repo:
it loads the data as below, calls :func:`train_classifier` and times it). The accuracies are
deterministic (two runs gave identical figures); the times are from runs on an otherwise idle
machine (with another 2-thread torch job running, the same training took 2-6x longer):

* Fashion-MNIST train split (``find_fashion_mnist(None, "train")``, 60,000 images, 28x28 gray),
  ``image_size=28, channels=1``: held-out accuracy **0.921** (6,000 held out), 52 s wall, 100 s CPU.
  With ``epochs=6``: 0.929 in 85 s wall.
* anime-tagged (``load_folder(.../anime-tagged/images, image_size=32, channels=3)``, 20,732 faces,
  ids mapped to ``tags.csv``; hair 12 classes, eyes 10), ``image_size=32``. Mirror groups: each
  image's 8x8 gray thumbnail against every image's flipped one (mean absolute difference, 0..255
  scale, 9 s): 12,104 images have a mirror closer than 2 (median 0.04), no other image has one
  closer than 8; so 6,052 mirror pairs, passed as ``groups``. Held-out hair **0.925**, eyes
  **0.877** (2,066 held out). Without groups (pairs may straddle the split): hair 0.930, eyes
  0.855 (2,073 held out), trained in 43 s wall, 62 s CPU; the grouped run does the same work (its
  idle-machine time was not taken). So no measurable optimism at these settings: flip augmentation
  makes a face and its mirror one training example, and 4 epochs memorise little.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.errors import ConfigError
from difflab.precision import Precision, autocast_context, autocast_dtype, to_memory_format

__all__ = [
    "ClassifierConfig",
    "LabelClassifier",
    "TrainedClassifier",
    "train_classifier",
]

#: ITU-R 601-2 luma, the weights of Pillow's RGB -> "L" conversion (difflab.data.decode).
_LUMA = (0.299, 0.587, 0.114)
_WEIGHT_DECAY = 0.01
_WARMUP_FRACTION = 0.02


@dataclass(frozen=True)
class ClassifierConfig:
    """How the classifier sees images and how it is trained (part of the cache key)."""

    image_size: int = 32  # images are resized (bilinear, antialiased) to this before the network
    channels: int = 3  # 1 or 3: gray input to a 3-channel classifier is repeated, RGB to a 1-channel one made luma
    width: int = 16  # channels of the first stage (then 2x, 4x)
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    val_fraction: float = 0.1  # share of the groups held out, chosen by a seeded permutation
    seed: int = 0
    augment_hflip: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"classifier config: {what}")

        kinds: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, kinds[str(f.type)]):
                raise ConfigError(f"classifier config: {f.name} must be of type {f.type}, got {value!r}")
            if f.type == "float":  # 1 and 1.0 are one config: one JSON form, one cache key
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        need(self.image_size >= 8, f"image_size must be at least 8 (two 2x poolings), got {self.image_size}")
        need(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        need(self.width >= 1, f"width must be positive, got {self.width}")
        need(self.epochs >= 1, f"epochs must be positive, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class LabelClassifier(nn.Module):
    """Three stages of (conv 3x3, BatchNorm, ReLU) x 2 with 2x2 max-pooling between them (widths
    w, 2w, 4w), a global average pool, and one linear head per attribute."""

    def __init__(self, sizes: Sequence[int], config: ClassifierConfig) -> None:
        super().__init__()
        if not sizes or any(int(k) < 1 for k in sizes):
            raise ConfigError(f"a classifier needs at least one attribute with at least one class, got sizes {list(sizes)}")
        self.sizes = tuple(int(k) for k in sizes)
        self.channels = config.channels
        w = config.width
        layers: list[nn.Module] = []
        cin = config.channels
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            layers += _conv_bn_relu(cin, cout) + _conv_bn_relu(cout, cout)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(cin, k) for k in self.sizes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x``: floats in [-1, 1], (B, C, S, S) -> one (B, classes) logits tensor per attribute."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"LabelClassifier expects (B, {self.channels}, S, S) input, got {tuple(x.shape)}")
        h = self.features(x).float().mean(dim=(2, 3))
        return [head(h) for head in self.heads]


# --------------------------------------------------------------------------------------------
# input checks and the image -> network-input protocol


def _check_images(images_u8: Tensor, what: str = "images") -> None:
    if not isinstance(images_u8, Tensor) or images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
        desc = f"{images_u8.dtype} tensor of shape {tuple(images_u8.shape)}" if isinstance(images_u8, Tensor) \
            else type(images_u8).__name__
        raise ConfigError(f"{what} must be a uint8 N x C x H x W tensor, got a {desc}")
    n, c, h, w = images_u8.shape
    if c not in (1, 3):
        raise ConfigError(f"{what} must have 1 or 3 channels, got {c}")
    if h != w or h < 1:
        raise ConfigError(f"{what} must be square, got {h}x{w}")
    if n == 0:
        raise ConfigError(f"no {what} given")


def _prepare(images_u8: Tensor, config: ClassifierConfig) -> Tensor:
    """uint8 N x C x H x W -> float32 N x config.channels x S x S in [-1, 1] (see the module docstring)."""
    x = images_u8.float()
    if x.shape[1] != config.channels:
        if config.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
    if x.shape[-1] != config.image_size:
        size = (config.image_size, config.image_size)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


def _check_names(attributes: Sequence[str],
                 classes: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    if isinstance(attributes, str):
        raise ConfigError(f"attributes must be a sequence of names, got the string {attributes!r}")
    attrs = tuple(attributes)
    if not attrs:
        raise ConfigError("a classifier needs at least one attribute")
    if any(not isinstance(a, str) or not a for a in attrs) or len(set(attrs)) != len(attrs):
        raise ConfigError(f"attribute names must be distinct non-empty strings, got {list(attrs)}")
    if "all" in attrs:
        raise ConfigError('"all" cannot be an attribute name: accuracy() reports the all-attributes share under it')
    if len(classes) != len(attrs):
        raise ConfigError(f"{len(attrs)} attributes but {len(classes)} class lists")
    out = []
    for a, names in zip(attrs, classes):
        if isinstance(names, str):
            raise ConfigError(f"classes of {a!r} must be a sequence of names, got the string {names!r}")
        names = tuple(names)
        if len(names) < 2 or any(not isinstance(c, str) for c in names) or len(set(names)) != len(names):
            raise ConfigError(f"attribute {a!r} needs at least two distinct class names, got {list(names)}")
        out.append(names)
    return attrs, tuple(out)


def _label_matrix(labels: Tensor, n: int, sizes: Sequence[int], attrs: Sequence[str], what: str,
                  allow_missing: bool) -> Tensor:
    """``labels`` as (n, A) int64 (a 1-D tensor is accepted for one attribute), range-checked."""
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        desc = f"a {labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise ConfigError(f"{what} must be an integer tensor, got {desc}")
    if labels.ndim == 1 and len(sizes) == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape != (n, len(sizes)):
        raise ConfigError(f"{what} must have shape ({n}, {len(sizes)}) (images x attributes), got {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    lowest = -1 if allow_missing else 0
    for a, (name, k) in enumerate(zip(attrs, sizes)):
        col = labels[:, a]
        if not allow_missing and bool((col == -1).any()):
            raise ConfigError(f"{what}: attribute {name!r} is -1 (not given) for {int((col == -1).sum())} image(s); "
                              "training needs every attribute of every image")
        bad = (col < lowest) | (col >= k)
        if bool(bad.any()):
            raise ConfigError(f"{what}: attribute {name!r} has {int(bad.sum())} value(s) outside {lowest}..{k - 1} "
                              f"(first: {int(col[bad][0])})")
    return labels


# --------------------------------------------------------------------------------------------
# the trained classifier


@dataclass
class TrainedClassifier:
    model: LabelClassifier
    config: ClassifierConfig
    sizes: tuple[int, ...]
    attributes: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    val_accuracy: dict[str, float]  # per attribute, on the held-out split
    n_train: int = 0
    n_val: int = 0
    seconds: float = 0.0  # training time

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def predict(self, images_u8: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted class indices, (N, A) int64, of uint8 N x C x H x W images (any square size)."""
        _check_images(images_u8)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        device = self.device
        dtype = autocast_dtype(Precision.AUTO, device)
        was_training = self.model.training
        self.model.eval()
        out = torch.empty((images_u8.shape[0], len(self.sizes)), dtype=torch.int64)
        try:
            for s in range(0, images_u8.shape[0], batch_size):
                x = _prepare(images_u8[s:s + batch_size].to(device), self.config)
                with autocast_context(device, dtype):
                    logits = self.model(x.contiguous(memory_format=torch.channels_last))
                out[s:s + batch_size] = torch.stack([z.float().argmax(dim=1) for z in logits], dim=1).cpu()
        finally:
            self.model.train(was_training)
        return out

    def accuracy(self, images_u8: Tensor, expected: Tensor) -> dict[str, float | None]:
        """Per attribute: the share of the images that requested it (``expected`` >= 0; -1 = not
        requested) whose predicted class is the requested one, None where no image requested it.
        ``"all"``: the share of images right on every attribute they requested (images that
        requested nothing are left out; None if that is all of them)."""
        _check_images(images_u8)
        want = _label_matrix(expected, images_u8.shape[0], self.sizes, self.attributes, "expected labels",
                             allow_missing=True)
        pred = self.predict(images_u8)
        asked = want >= 0
        result: dict[str, float | None] = {}
        for a, name in enumerate(self.attributes):
            m = asked[:, a]
            result[name] = float((pred[m, a] == want[m, a]).double().mean()) if bool(m.any()) else None
        rows = asked.any(dim=1)
        right = ((pred == want) | ~asked).all(dim=1)
        result["all"] = float(right[rows].double().mean()) if bool(rows.any()) else None
        return result


# --------------------------------------------------------------------------------------------
# training


def _group_ids(groups: Tensor | None, n: int) -> Tensor:
    if groups is None:
        return torch.arange(n)
    if not isinstance(groups, Tensor) or groups.dtype.is_floating_point or groups.dtype.is_complex or groups.shape != (n,):
        desc = f"a {groups.dtype} tensor of shape {tuple(groups.shape)}" if isinstance(groups, Tensor) else type(groups).__name__
        raise ConfigError(f"groups must be an integer tensor of shape ({n},) (one id per image), got {desc}")
    return torch.unique(groups.to(torch.int64), return_inverse=True)[1]


def _split(n: int, groups: Tensor | None, config: ClassifierConfig) -> tuple[Tensor, Tensor]:
    """(train indices, held-out indices): a ``config.seed`` permutation of the groups, the first
    ``val_fraction`` of them held out."""
    gid = _group_ids(groups, n)
    n_groups = int(gid.max()) + 1
    n_val = max(1, round(config.val_fraction * n_groups))
    if n_val >= n_groups:
        raise ConfigError(f"cannot hold out {config.val_fraction:g} of {n_groups} image group(s) and keep any for training")
    perm = torch.randperm(n_groups, generator=torch.Generator().manual_seed(config.seed))
    held = torch.zeros(n_groups, dtype=torch.bool)
    held[perm[:n_val]] = True
    is_val = held[gid]
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def _lr_at(step: int, total: int, lr: float) -> float:
    warm = max(1, round(_WARMUP_FRACTION * total))
    return lr * min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_classifier(
    images_u8: Tensor,
    labels: Tensor,
    attributes: Sequence[str],
    classes: Sequence[Sequence[str]],
    config: ClassifierConfig = ClassifierConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    *,
    groups: Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TrainedClassifier:
    """Train a :class:`LabelClassifier` on labelled real images and measure it on a held-out split.

    ``images_u8``: uint8 N x C x H x W (C 1 or 3, H = W); ``labels``: (N, A) integers, column ``a``
    indexing ``classes[a]`` (-1, "not given", is refused); ``groups``: optional (N,) ids, images
    with the same id stay on the same side of the split; ``device``: default CUDA if available.
    """
    attrs, names = _check_names(attributes, classes)
    sizes = tuple(len(c) for c in names)
    _check_images(images_u8)
    n = images_u8.shape[0]
    labels = _label_matrix(labels, n, sizes, attrs, "training labels", allow_missing=False)
    train_idx, val_idx = _split(n, groups, config)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = autocast_dtype(Precision.AUTO, dev)

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(config.seed)
        model = to_memory_format(LabelClassifier(sizes, config).to(dev))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=_WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total = config.epochs * steps_per_epoch
    model.train()
    with tqdm(total=total, desc="classifier", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        step = 0
        for _ in range(config.epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            for s in range(0, len(order), config.batch_size):
                idx = order[s:s + config.batch_size]
                x = _prepare(images_u8[idx], config)
                if config.augment_hflip:
                    flip = (torch.rand(len(idx), generator=gen) < 0.5).view(-1, 1, 1, 1)
                    x = torch.where(flip, x.flip(-1), x)
                x = x.to(dev).contiguous(memory_format=torch.channels_last)
                y = labels[idx].to(dev)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, config.lr)
                with autocast_context(dev, dtype):
                    logits = model(x)
                loss = sum((F.cross_entropy(z.float(), y[:, a]) for a, z in enumerate(logits)), torch.zeros((), device=dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                if step % 20 == 0 or step == total:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        model.eval()
        clf = TrainedClassifier(model=model, config=config, sizes=sizes, attributes=attrs, classes=names,
                                val_accuracy={}, n_train=len(train_idx), n_val=len(val_idx))
        pred = clf.predict(images_u8[val_idx])
        truth = labels[val_idx]
        clf.val_accuracy = {a: float((pred[:, i] == truth[:, i]).double().mean()) for i, a in enumerate(attrs)}
        bar.set_postfix({f"val {a}": f"{v:.3f}" for a, v in clf.val_accuracy.items()})
    clf.seconds = time.perf_counter() - start
    return clf
