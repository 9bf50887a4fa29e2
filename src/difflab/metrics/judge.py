"""The judge of a conditional run: the label classifier trained on the run's own labelled training data
(:mod:`difflab.metrics.accuracy`), cached per data set (:mod:`difflab.metrics.classifier_cache`), and the
accuracy of generated images against the labels they were asked for (read from the sampling record beside
their folder, :mod:`difflab.records`)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from difflab.errors import ConfigError
from difflab.metrics.accuracy import ClassifierConfig, TrainedClassifier
from difflab.metrics.classifier_cache import classifier_for


def _data_key(source: str, labels: str, image_size: int, channels: int) -> str:
    """What the classifier's training data is: the images (a folder's digest, or the built-in name), the
    label file's bytes, the size and channels it was decoded at."""
    from difflab.data.dataset import BUILTIN_DATASETS
    from difflab.data.images import find_images
    from difflab.metrics.features import folder_digest

    h = hashlib.sha256(f"{source in BUILTIN_DATASETS and source}|{image_size}|{channels}|{labels}".encode())
    if source not in BUILTIN_DATASETS:
        root = Path(source).expanduser()
        h.update(folder_digest(root, find_images(root)).encode())
    if labels.lower().endswith(".csv"):
        h.update(Path(labels).expanduser().read_bytes())
    return h.hexdigest()


def run_classifier(run_dir: str | os.PathLike[str], *, use_cache: bool = True, progress: bool = True,
                   device: str | torch.device | None = None) -> tuple[TrainedClassifier, bool]:
    """The classifier for ``run_dir``'s labelled training data (trained once, then cached); returns it
    and whether it came from the cache."""
    from difflab.config import RunConfig
    from difflab.data.dataset import load_dataset
    from difflab.train.checkpoint import CONFIG, require_run

    cfg = RunConfig.load(require_run(run_dir) / CONFIG)
    schema = cfg.cond.schema
    if schema is None:
        raise ConfigError(f"--run {run_dir} was trained without labels: there is nothing to judge accuracy against")
    d = cfg.data
    data = load_dataset(d.source, d.image_size, d.channels or None, labels=d.labels, progress=progress)
    assert data.labels is not None
    channels = int(data.images.shape[1])
    config = ClassifierConfig(image_size=d.image_size, channels=channels)
    return classifier_for(data.images, data.labels.in_schema(schema), schema.attributes, schema.classes,
                          data_key=_data_key(d.source, d.labels, d.image_size, channels), config=config,
                          use_cache=use_cache, progress=progress, device=device)


def images_to_tensor(images: list) -> torch.Tensor:
    """Decoded PIL images of one size -> uint8 N x C x H x W."""
    import numpy as np

    arrays = [np.asarray(img) for img in images]
    if len({a.shape for a in arrays}) != 1:
        raise ConfigError("accuracy needs images of one size; the folder mixes sizes")
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked.permute(0, 3, 1, 2).contiguous() if stacked.ndim == 4 else stacked[:, None]
