"""The record of a sample set, written beside its images folder (never inside: a submission folder
holds only ``1.jpg .. N.jpg``): ``<folder>.sampling.json``, or ``<folder>.sampling-from-K.json`` for a
shard that starts at image K. It names the run, sampler, seeds, guidance and, for conditional
samples, which images were asked for which condition; :func:`expected_labels` reads that back for
``difflab eval``'s accuracy."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difflab.captions import Request
from difflab.data.labels import LabelSchema
from difflab.errors import DataError
from difflab.io import atomic_write_json


def record_path(images: str | Path, start: int = 0) -> Path:
    """Where the record of the images folder ``images`` goes (beside it)."""
    out = Path(images).expanduser().resolve()
    return out.parent / (f"{out.name}.sampling.json" if start == 0 else f"{out.name}.sampling-from-{start + 1}.json")


def conditions(reqs: Sequence[Request], n: int, schema: LabelSchema | None) -> list[dict[str, Any]]:
    """Which images (1-based, inclusive ranges) were asked for which condition: ``n`` per request."""
    return [{"images": [k * n + 1, (k + 1) * n], "condition": r.description,
             "labels": None if r.labels is None or schema is None else schema.names(r.labels), "prompt": r.prompt}
            for k, r in enumerate(reqs)]


def write_record(images: str | Path, record: dict[str, Any], start: int = 0) -> Path:
    path = record_path(images, start)
    atomic_write_json(path, {**record, "images": str(Path(images).expanduser().resolve())})
    return path


def expected_labels(images: str | Path, names: Sequence[str], schema: LabelSchema) -> torch.Tensor:
    """The labels asked for image ``k.jpg`` (row k - 1 of the result, (N, A), -1 = not asked), for the
    image names ``names`` (file names in the folder), read from the folder's record(s)."""
    folder = Path(images).expanduser().resolve()
    records = sorted(folder.parent.glob(f"{folder.name}.sampling*.json"))
    if not records:
        raise DataError(f"no sampling record beside {folder} ({record_path(folder).name}): accuracy needs to know which "
                        "label each image was asked for; sample with difflab sample --class/--label")
    asked: dict[int, list[int]] = {}
    for path in records:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"sampling record {path} is unreadable: {e}") from None
        for c in rec.get("conditions", []):
            if c.get("labels") is None:
                continue
            row = schema.parse(",".join(f"{a}={v}" for a, v in c["labels"].items() if v is not None))
            for k in range(c["images"][0], c["images"][1] + 1):
                asked[k] = row
    out = torch.full((len(names), len(schema.attributes)), -1, dtype=torch.long)
    for i, name in enumerate(names):
        stem = Path(name).stem
        if stem.isdigit() and int(stem) in asked:
            out[i] = torch.tensor(asked[int(stem)])
    if not bool((out >= 0).any()):
        raise DataError(f"the sampling record(s) beside {folder} ask for no labels: nothing to score accuracy against")
    return out
