"""FID, KID and detection rates of a folder of images: :func:`evaluate` with an :class:`EvalConfig`
(the ``difflab eval`` and ``fid-stats`` commands are :mod:`difflab.cli.evaluate`). Bad input raises
:class:`difflab.errors.DifflabError` subclasses, which the CLI prints as one line.

One pass over the generated folder decodes each image once and feeds both the Inception
network and the detectors. The real folder's features and statistics come from the cache
(see :mod:`difflab.metrics.features`) or are computed once and cached.

The generated folder is listed once, and only whole images are listed (``difflab sample`` writes
each under a hidden temporary name first, :mod:`difflab.sample_sets`), so it may be evaluated while
shards still write it: when the sampling records beside it name images that are not there, or a
record is not complete yet, one warning says so and the images present are scored. ``n_fake`` is how
many were scored, ``n_fake_expected`` how many the records name (None: no records).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.data.labels import LabelSchema
from difflab.devices import resolve_device
from difflab.errors import ConfigError, DataError, DifflabWarning, parse_choice
from difflab.metrics.detect import (
    DetectorKind,
    DetectProtocol,
    detection_counts,
    make_detector,
    protocol_dict,
)
from difflab.metrics.features import FolderScan, ReferenceStats, load_stats, reference_stats
from difflab.metrics.fid import fid_from_features, gaussian_stats
from difflab.metrics.inception import InceptionFeatures
from difflab.metrics.kid import kid
from difflab.metrics.precision_recall import precision_recall
from difflab.precision import torch_threads
from difflab.sample_sets import sample_set_status

__all__ = [
    "EvalConfig",
    "Metric",
    "check_positive_int",
    "evaluate",
    "format_table",
]


PR_K = 3  # the paper's neighbourhood size


class Metric(str, Enum):
    FID = "fid"
    KID = "kid"
    PR = "pr"  # improved precision and recall (Kynkaanniemi et al. 2019): quality and coverage apart
    DETECT = "detect"
    ACCURACY = "accuracy"  # conditional runs: does each image show the label it was asked for


def check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _choices(enum_cls: type[Enum], value: object, what: str) -> tuple:
    """A comma-separated string or a sequence -> a tuple of distinct enum members, in order."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    if not items or any(i == "" for i in items):
        raise ConfigError(f"{what} must be a non-empty comma-separated list, got {value!r}")
    out = []
    for item in items:
        member = parse_choice(enum_cls, item, what)
        if member not in out:
            out.append(member)
    return tuple(out)


@dataclass(frozen=True)
class EvalConfig:
    """What ``difflab eval`` computes. ``real`` is a folder or a stats ``.npz`` (``fid-stats``)."""

    fake: str
    real: str | None = None
    metrics: tuple[Metric, ...] = (Metric.FID, Metric.KID, Metric.DETECT)
    detectors: tuple[DetectorKind, ...] = (DetectorKind.LBP, DetectorKind.ANIMEFACE)
    batch_size: int = 50
    threads: int | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    detect: DetectProtocol = field(default_factory=DetectProtocol)
    cascade: str | None = None
    fid_weights: str | None = None
    use_cache: bool = True
    progress: bool = True
    run: str | None = None  # for accuracy: the conditional run whose training data trains the judge
    device: str = "auto"  # the Inception network's and the judge's (difflab.devices.resolve_device)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _choices(Metric, self.metrics, "metric"))
        object.__setattr__(self, "detectors", _choices(DetectorKind, self.detectors, "detector"))
        check_positive_int(self.batch_size, "batch size")
        check_positive_int(self.kid_subsets, "kid subsets")
        check_positive_int(self.kid_subset_size, "kid subset size")
        if self.threads is not None:
            check_positive_int(self.threads, "threads")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.fake:
            raise ConfigError("--fake is required")
        if self.needs_inception and not self.real:
            raise ConfigError("--real is required for fid, kid and pr")
        if Metric.ACCURACY in self.metrics and not self.run:
            raise ConfigError("--run is required for accuracy (the run's labelled data trains the classifier that judges)")

    @property
    def needs_inception(self) -> bool:
        return Metric.FID in self.metrics or Metric.KID in self.metrics or Metric.PR in self.metrics


def _check_real(real: str) -> Path:
    path = Path(real).expanduser()
    if not path.exists():
        raise DataError(f"--real {path} does not exist")
    if not (path.is_dir() or (path.is_file() and path.suffix == ".npz")):
        raise DataError(f"--real {path} is neither a folder of images nor a .npz from `difflab fid-stats`")
    return path


def _load_real(cfg: EvalConfig, extractor: InceptionFeatures) -> tuple[ReferenceStats, str]:
    assert cfg.real is not None
    path = _check_real(cfg.real)
    if path.is_file():
        return load_stats(path, extractor.protocol()), f"stats file {path}"
    ref, cached, hit = reference_stats(path, extractor, progress=cfg.progress, use_cache=cfg.use_cache)
    return ref, f"{'cached' if hit else 'computed and cached'} stats {cached}"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the metrics of ``cfg``; return the result dict that ``--json`` writes."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    scan = FolderScan(cfg.fake)  # fails fast on a missing or empty folder
    # a folder from `difflab sample`: are all the images its records name here (it may still be written)?
    try:
        status = sample_set_status(scan.root, scan.files)
    except DataError as e:  # a damaged record beside the folder does not stop the scores
        warnings.warn(f"{e}; --fake not checked against its sampling records", DifflabWarning, stacklevel=2)
        status = None
    short = status.message(f"--fake {scan.root}", len(scan.files)) if status is not None else None
    if short is not None:
        warnings.warn(short, DifflabWarning, stacklevel=2)
    if cfg.real is not None and cfg.needs_inception:
        real = _check_real(cfg.real)
        if real.is_dir():
            FolderScan(real)  # missing or empty: fail before loading anything

    detectors = []
    if Metric.DETECT in cfg.metrics:
        t = time.perf_counter()
        detectors = [make_detector(k, cfg.detect, cfg.cascade) for k in cfg.detectors]  # self-checks run here
        timings["detector_setup_s"] = time.perf_counter() - t

    result: dict[str, Any] = {
        "fake": str(Path(cfg.fake).expanduser()), "real": cfg.real,
        "fid": None, "kid_mean": None, "kid_std": None, "precision": None, "recall": None, "detect_rate": None,
        "accuracy": None,
        "n_real": None, "n_fake": None, "n_fake_expected": None if status is None else status.expected,
    }
    judge = None
    if Metric.ACCURACY in cfg.metrics:
        from difflab.metrics.judge import run_classifier

        assert cfg.run is not None
        t = time.perf_counter()
        judge, hit = run_classifier(cfg.run, use_cache=cfg.use_cache, progress=cfg.progress,
                                    device=resolve_device(cfg.device))
        timings["classifier_s"] = time.perf_counter() - t
        result["classifier"] = {"held_out_accuracy": judge.val_accuracy, "cached": hit, "n_train": judge.n_train,
                                "n_val": judge.n_val, "image_size": judge.config.image_size}
    protocol: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        ref = extractor = None
        if cfg.needs_inception:
            t = time.perf_counter()
            extractor = InceptionFeatures(cfg.fid_weights, batch_size=cfg.batch_size, device=resolve_device(cfg.device))
            timings["network_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            ref, how = _load_real(cfg, extractor)
            timings["real_stats_s"] = time.perf_counter() - t
            result["real_stats"] = how
            result["n_real"] = ref.n
            result["n_real_skipped"] = len(ref.skipped)
            protocol["fid"] = {**extractor.protocol(), "backend": extractor.backend}

        t = time.perf_counter()
        feats, counts, pixels = [], [], []
        desc = "eval " + " + ".join(["inception"] * bool(extractor) + [d.name for d in detectors] + ["classifier"] * bool(judge))
        for batch in scan.batches(cfg.batch_size, progress=cfg.progress, desc=desc):
            if extractor is not None:
                feats.append(extractor.images(batch))
            if detectors:
                counts.append(detection_counts(batch, detectors, cfg.detect))
            if judge is not None:
                from difflab.metrics.judge import images_to_tensor

                pixels.append(images_to_tensor(batch))
        timings["fake_pass_s"] = time.perf_counter() - t
        result["n_fake"] = len(scan.paths)
        result["n_fake_skipped"] = len(scan.skipped)

        if extractor is not None and ref is not None:
            fake_feats = np.concatenate(feats)
            if Metric.FID in cfg.metrics:
                t = time.perf_counter()
                result["fid"] = fid_from_features(ref.stats, gaussian_stats(fake_feats, f"--fake {cfg.fake}"))
                timings["fid_s"] = time.perf_counter() - t
            if Metric.KID in cfg.metrics:
                t = time.perf_counter()
                k = kid(ref.features, fake_feats, subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size,
                        seed=cfg.seed, progress=cfg.progress)
                result["kid_mean"], result["kid_std"] = k.mean, k.std
                timings["kid_s"] = time.perf_counter() - t
                protocol["kid"] = {
                    "kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2 over random subsets",
                    "subsets": k.subsets, "subset_size": k.subset_size, "seed": cfg.seed, "std": "ddof=0",
                }
            if Metric.PR in cfg.metrics:
                t = time.perf_counter()
                pr = precision_recall(ref.features, fake_feats, k=PR_K)
                result["precision"], result["recall"] = pr.precision, pr.recall
                timings["pr_s"] = time.perf_counter() - t
                protocol["pr"] = {"method": "Kynkaanniemi et al. 2019, k-NN balls on Inception pool features", "k": pr.k}
    if judge is not None:
        from difflab.records import expected_labels

        expected = expected_labels(cfg.fake, scan.paths, LabelSchema(judge.attributes, judge.classes))
        result["accuracy"] = judge.accuracy(torch.cat(pixels), expected)
        protocol["accuracy"] = {"classifier": "difflab.metrics.accuracy.LabelClassifier", "run": cfg.run,
                                "asked": "the sampling record beside the folder"}
    if detectors:
        c = np.concatenate(counts)
        rates = {d.name: float((c[:, i] > 0).mean()) for i, d in enumerate(detectors)}
        for name, rate in rates.items():
            result[f"detect_rate_{name}"] = rate
        result["detect_rate"] = rates[detectors[0].name]
        result["detect_rate_primary"] = detectors[0].name
        protocol["detect"] = {**protocol_dict(cfg.detect), "detectors": {d.name: d.settings() for d in detectors}}
    result["protocol"] = protocol
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = timings
    result["config"] = {k: (v if not isinstance(v, tuple) else [getattr(x, "value", x) for x in v])
                        for k, v in asdict(cfg).items() if k != "detect"}
    return result


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary that ``difflab eval`` prints."""
    expected = result.get("n_fake_expected")
    rows = [("images", f"{_fmt(result.get('n_fake'), 'd')} generated"
             + (f" (its sampling records name {expected})" if expected is not None and expected != result.get("n_fake") else "")
             + (f", {result['n_real']} real" if result.get("n_real") is not None else ""))]
    skipped = [f"{result[k]} {w}" for k, w in (("n_fake_skipped", "generated"), ("n_real_skipped", "real"))
               if result.get(k)]
    if skipped:
        rows.append(("skipped files", ", ".join(skipped)))
    if result.get("fid") is not None:
        rows.append(("FID", _fmt(result["fid"], ".3f")))
    if result.get("kid_mean") is not None:
        m = (result.get("protocol") or {}).get("kid", {}).get("subset_size")
        if m is not None and m == result.get("n_fake") == result.get("n_real"):  # every subset holds every image
            rows.append(("KID", f"{result['kid_mean']:.5f} (each subset is all {m} images of both sets: no spread to report)"))
        else:
            rows.append(("KID", f"{result['kid_mean']:.5f} +- {result['kid_std']:.5f}"))
    if result.get("precision") is not None:
        rows.append(("precision / recall", f"{result['precision']:.4f} / {result['recall']:.4f} (k = {PR_K})"))
    for key, value in result.items():
        if key.startswith("detect_rate_") and key != "detect_rate_primary":
            rows.append((f"detect rate ({key[len('detect_rate_'):]})", f"{value:.4f}"))
    for key, value in (result.get("accuracy") or {}).items():
        if value is not None:
            rows.append((f"accuracy ({key})", f"{value:.4f}"))
    if result.get("classifier"):
        judged = result["classifier"]["held_out_accuracy"]
        rows.append(("judge held-out accuracy", ", ".join(f"{k} {v:.4f}" for k, v in judged.items())))
    rows.append(("time", f"{result['timings']['total_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
