"""The cache of trained label classifiers (:mod:`difflab.metrics.accuracy`): :func:`classifier_for`
returns the classifier for a data set, loaded from the cache or trained and stored;
:func:`save_classifier` / :func:`load_classifier` write and read one classifier's files.

Cache: ``difflab.io.cache_dir("classifiers") / key`` with ``weights.safetensors`` and
``meta.json`` (config, sizes, attributes, classes, held-out accuracy, split sizes, training time,
torch version, the weights' sha256); the key is a sha256 over the caller's ``data_key``, the
config, the attributes and classes, the group ids and :data:`CLASSIFIER_FORMAT`. An entry is
written in a temporary folder (meta.json last) and renamed into place, so a crash leaves no half
entry; a damaged one is reported as a :class:`~difflab.errors.DifflabWarning` and retrained.
No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from difflab.errors import CheckpointError, ConfigError, DifflabError, DifflabWarning
from difflab.io import atomic_path, atomic_write_json, cache_dir, fsync_dir, sha256_file
from difflab.metrics.accuracy import ClassifierConfig, LabelClassifier, TrainedClassifier, _check_names, train_classifier
from difflab.precision import to_memory_format
from difflab.train.checkpoint import load_tensors, load_weights, save_tensors

__all__ = [
    "CLASSIFIER_FORMAT",
    "classifier_for",
    "classifier_key",
    "load_classifier",
    "save_classifier",
]

#: Bump when the network, the input protocol or the files of a saved classifier change.
CLASSIFIER_FORMAT = 1

WEIGHTS = "weights.safetensors"
META = "meta.json"

#: Temporary cache folders older than this are left over from a crash and removed.
_STALE_TMP_SECONDS = 3600.0


def save_classifier(c: TrainedClassifier, folder: Path) -> None:
    """Write ``folder/weights.safetensors`` then ``folder/meta.json`` (each atomically; no pickle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_tensors(dict(c.model.state_dict()), tmp)
        digest = sha256_file(tmp)
    atomic_write_json(folder / META, {
        "format": CLASSIFIER_FORMAT,
        "config": c.config.to_dict(),
        "sizes": list(c.sizes),
        "attributes": list(c.attributes),
        "classes": [list(k) for k in c.classes],
        "val_accuracy": c.val_accuracy,
        "n_train": c.n_train,
        "n_val": c.n_val,
        "seconds": c.seconds,
        "torch": torch.__version__,
        "weights_sha256": digest,
    })


def load_classifier(folder: Path) -> TrainedClassifier:
    """Read a classifier written by :func:`save_classifier` (on the CPU); CheckpointError if missing or damaged."""
    folder = Path(folder)
    meta_path, weights_path = folder / META, folder / WEIGHTS
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing (not a saved classifier)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({type(e).__name__}: {e})") from None
    try:
        if meta["format"] != CLASSIFIER_FORMAT:
            raise CheckpointError(f"{meta_path}: classifier format {meta['format']}, this difflab reads "
                                  f"{CLASSIFIER_FORMAT}; retrain it")
        config = ClassifierConfig(**meta["config"])
        attrs, names = _check_names(meta["attributes"], meta["classes"])
        sizes = tuple(int(k) for k in meta["sizes"])
        val_accuracy = {str(k): float(v) for k, v in meta["val_accuracy"].items()}
        n_train, n_val, seconds = int(meta["n_train"]), int(meta["n_val"]), float(meta["seconds"])
        digest = str(meta["weights_sha256"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, DifflabError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({type(e).__name__}: {e})") from None
    if sizes != tuple(len(k) for k in names):
        raise CheckpointError(f"{meta_path} is damaged: sizes {list(sizes)} do not match the class lists")
    try:
        actual = sha256_file(weights_path)
    except FileNotFoundError:
        raise CheckpointError(f"classifier weights {weights_path} are missing") from None
    except OSError as e:
        raise CheckpointError(f"classifier weights {weights_path} are unreadable ({e})") from None
    if actual != digest:
        raise CheckpointError(f"classifier weights {weights_path} are damaged (sha256 differs from {META})")
    model = LabelClassifier(sizes, config)
    load_weights(model, load_tensors(weights_path), weights_path, meta_path)
    model = to_memory_format(model).eval()
    return TrainedClassifier(model=model, config=config, sizes=sizes, attributes=attrs, classes=names,
                             val_accuracy=val_accuracy, n_train=n_train, n_val=n_val, seconds=seconds)


def classifier_key(data_key: str, attributes: Sequence[str], classes: Sequence[Sequence[str]],
                   config: ClassifierConfig, groups: Tensor | None = None) -> str:
    """The cache key: sha256 over the data key, the config, attributes, classes, groups and format."""
    group_digest = None
    if groups is not None:
        group_digest = hashlib.sha256(groups.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
    text = json.dumps({
        "format": CLASSIFIER_FORMAT,
        "data_key": data_key,
        "config": config.to_dict(),
        "attributes": list(attributes),
        "classes": [list(k) for k in classes],
        "groups": group_digest,
    }, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _store(c: TrainedClassifier, root: Path, key: str) -> None:
    """Save ``c`` as ``root/key``: written in a temporary folder, then renamed into place."""
    now = time.time()
    for stale in root.glob("*.tmp-*"):  # left by a crash mid-write (recent ones may be another process's)
        try:
            if now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
    try:
        save_classifier(c, tmp)
        fsync_dir(tmp)
        if final.exists():  # a damaged entry being replaced
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / META).is_file():
                raise
            return  # another process stored the same entry first: keep theirs
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def classifier_for(
    images_u8: Tensor,
    labels: Tensor,
    attributes: Sequence[str],
    classes: Sequence[Sequence[str]],
    *,
    data_key: str,
    config: ClassifierConfig = ClassifierConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    groups: Tensor | None = None,
    use_cache: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[TrainedClassifier, bool]:
    """The classifier for this data, from the cache or trained (and cached); returns it and whether it
    was a cache hit. ``data_key`` names the data (e.g. the image folder's digest plus the label file's);
    ``use_cache=False`` retrains and refreshes the entry."""
    if not isinstance(data_key, str) or not data_key:
        raise ConfigError("classifier_for needs a non-empty data_key naming the training data")
    attrs, names = _check_names(attributes, classes)
    key = classifier_key(data_key, attrs, names, config, groups)
    root = cache_dir("classifiers")
    folder = root / key
    if use_cache and (folder / META).exists():
        try:
            c = load_classifier(folder)
            if (c.config, c.attributes, c.classes) != (config, attrs, names):
                raise CheckpointError(f"{folder / META} describes another classifier than its key")
            if device is not None:
                c.model.to(torch.device(device))
            return c, True
        except CheckpointError as e:
            warnings.warn(f"retraining the classifier: damaged cache entry: {e}", DifflabWarning, stacklevel=2)
    c = train_classifier(images_u8, labels, attrs, names, config, groups=groups, device=device, progress=progress)
    try:
        _store(c, root, key)
    except OSError as e:  # a full or read-only cache must not lose the result
        warnings.warn(f"could not write the classifier cache {folder}: {e}", DifflabWarning, stacklevel=2)
    return c, False
