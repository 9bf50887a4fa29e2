"""Segmentation scores: the confusion matrix, IoU, Dice and pixel accuracy, and whether a
model's uncertainty points at its errors.

* :func:`confusion` counts (truth, prediction) pixel pairs; :func:`scores` turns the counts into
  per-class IoU and Dice, their means over the classes and the pixel accuracy.
* :func:`uncertainty_ranking` asks whether the pixels a model is least sure of are the ones it gets
  wrong: the error rate among the ``top`` most uncertain pixels against the rest.
* :func:`evaluate_folders` scores a folder of predicted masks against the true ones (the
  ``difflab eval-seg`` command, :mod:`difflab.cli.evaluate`); :func:`format_scores` prints the result.

Masks are class-index PNGs as :mod:`difflab.data.paired` reads and writes them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difflab.data.decode import _shown
from difflab.data.images import find_images
from difflab.data.paired import MAX_CLASSES, _index_array, read_mask
from difflab.errors import ConfigError, DataError

__all__ = ["confusion", "evaluate_folders", "format_scores", "scores", "uncertainty_ranking"]

#: Suffixes of the files beside the predictions that are not predictions themselves.
OVERLAY_SUFFIX = "_overlay"
UNCERTAINTY_SUFFIX = "_uncertainty"

_MAP_HINT = "save uncertainty maps as 8-bit single-channel PNGs (mode L), higher = less sure"


def _check_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be an integer in 1..{MAX_CLASSES}, got {num_classes!r}")
    return num_classes


def _check_top(top: object) -> float:
    if isinstance(top, bool) or not isinstance(top, (int, float)) or not (math.isfinite(top) and 0.0 < top < 1.0):
        raise ConfigError(f"top must be a fraction in (0, 1), got {top!r}")
    return float(top)


def confusion(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The (K, K) int64 confusion matrix: entry [t, p] counts the pixels of true class t predicted as p
    (rows = truth, columns = prediction). ``pred`` and ``truth``: integer class indices of one shape,
    (N, H, W) or (H, W); an index outside 0..K-1 is a ValueError."""
    k = _check_classes(num_classes)
    if pred.shape != truth.shape:
        raise ValueError(f"confusion: prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    for t, what in ((pred, "prediction"), (truth, "truth")):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"confusion: the {what} must hold integer class indices, got {t.dtype}")
    p, t = pred.reshape(-1).long(), truth.reshape(-1).long()
    for x, what in ((p, "prediction"), (t, "truth")):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= k):
            raise ValueError(f"confusion: the {what} holds class index {int(x.max()) if int(x.max()) >= k else int(x.min())}, "
                             f"outside 0..{k - 1}")
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k).cpu()


def scores(conf: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Scores of a confusion matrix (rows = truth, columns = prediction) over the named classes.

    Returns ``{"miou", "iou": {name: v}, "dice": {name: v}, "mean_dice", "pixel_accuracy", "pixels":
    {name: true pixel count}}``, with IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN) per
    class and pixel accuracy = correct pixels / all pixels. A class absent from both the truth and the
    prediction has no IoU or Dice (None) and is left out of the means (it would count as a free 1 or
    a spurious 0); a class present in only one of them scores 0. The means are None when no class is
    present (an empty matrix).
    """
    names = tuple(classes)
    k = len(names)
    if conf.ndim != 2 or tuple(conf.shape) != (k, k):
        raise ValueError(f"scores: a confusion matrix of {k} classes must be {k}x{k}, got {tuple(conf.shape)}")
    c = conf.to(torch.float64).cpu()
    tp = c.diagonal()
    fp = c.sum(0) - tp
    fn = c.sum(1) - tp
    iou: dict[str, float | None] = {}
    dice: dict[str, float | None] = {}
    for i, name in enumerate(names):
        union = float(tp[i] + fp[i] + fn[i])
        iou[name] = None if union == 0 else float(tp[i]) / union
        dice[name] = None if union == 0 else 2.0 * float(tp[i]) / (union + float(tp[i]))
    present_iou = [v for v in iou.values() if v is not None]
    present_dice = [v for v in dice.values() if v is not None]
    total = float(c.sum())
    return {
        "miou": sum(present_iou) / len(present_iou) if present_iou else None,
        "iou": iou,
        "dice": dice,
        "mean_dice": sum(present_dice) / len(present_dice) if present_dice else None,
        "pixel_accuracy": float(tp.sum()) / total if total else None,
        "pixels": {name: int(conf[i].sum()) for i, name in enumerate(names)},
    }


def uncertainty_ranking(errors: torch.Tensor, uncertainty: torch.Tensor, top: float = 0.1) -> dict[str, Any]:
    """Do the most uncertain pixels hold the errors? ``errors`` (bool or 0/1, True = wrong pixel) and
    ``uncertainty`` (higher = less sure) of one shape, pooled over all their pixels.

    The ``k = round(top * n)`` most uncertain pixels (at least 1, at most n - 1) form the top group.
    Returns ``{"error_rate_top", "error_rate_rest", "ratio" (top / rest; None when the rest has no
    error), "top", "num_top", "num_pixels"}``; a ratio well above 1 means the uncertainty is useful.
    Ties are broken deterministically and without regard to pixel order: the pixels tied at the
    cut-off value are shared between the groups pro rata, each counting with the tied group's error
    rate (so a constant uncertainty gives both groups the overall error rate, ratio 1).
    """
    share = _check_top(top)
    if errors.shape != uncertainty.shape:
        raise ValueError(f"uncertainty_ranking: errors {tuple(errors.shape)} and uncertainty {tuple(uncertainty.shape)} "
                         "differ in shape")
    e = errors.reshape(-1).cpu() != 0
    u = uncertainty.reshape(-1).cpu()  # compared as it is (uint8 maps stay 1 byte a pixel)
    if u.dtype == torch.bool:
        u = u.to(torch.uint8)
    n = e.numel()
    if n < 2:
        raise ValueError(f"uncertainty_ranking needs at least 2 pixels, got {n}")
    if u.is_floating_point() and bool(torch.isnan(u).any()):
        raise ValueError("uncertainty_ranking: the uncertainty holds NaN")
    k = min(max(1, round(share * n)), n - 1)
    cut = torch.sort(u, descending=True).values[k - 1]
    above = u > cut
    tied = u == cut
    n_above = int(above.sum())
    n_tied = int(tied.sum())
    err_above = int(e[above].sum())
    err_tied = int(e[tied].sum())
    err_top = err_above + err_tied * (k - n_above) / n_tied
    err_rest = int(e.sum()) - err_top
    rate_top = err_top / k
    rate_rest = max(err_rest, 0.0) / (n - k)
    return {
        "error_rate_top": rate_top,
        "error_rate_rest": rate_rest,
        "ratio": rate_top / rate_rest if rate_rest > 0 else None,
        "top": share,
        "num_top": k,
        "num_pixels": n,
    }


# --------------------------------------------------------------------------------------------
# folders


def _masks_by_stem(folder: Path, *, predictions: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in find_images(folder):
        key = f.relative_to(folder).with_suffix("").as_posix()
        if predictions and (f.suffix.lower() != ".png" or key.endswith((OVERLAY_SUFFIX, UNCERTAINTY_SUFFIX))):
            continue
        if key in found:
            raise DataError(f"{_shown(f)}: a second mask for {key!r} beside {_shown(found[key])}: keep one file per id")
        found[key] = f
    return found


def _folder(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} folder {_shown(p)} {'is not a folder' if p.exists() else 'does not exist'}")
    return p


def evaluate_folders(pred_dir: str | os.PathLike[str], truth_dir: str | os.PathLike[str], classes: Sequence[str], *,
                     uncertainty_dir: str | os.PathLike[str] | None = None, top: float = 0.1,
                     only_predicted: bool = False) -> dict[str, Any]:
    """Score the predicted masks in ``pred_dir`` against the true masks in ``truth_dir``.

    Predictions are the ``<id>.png`` files of ``pred_dir`` (``<id>_overlay.png`` and
    ``<id>_uncertainty.png`` are not); each is paired with the truth mask of the same id (path below the
    folder without its extension, any image suffix). A prediction without a truth mask, a truth mask
    without a prediction (unless ``only_predicted``: then only the predicted ids are scored), masks of
    different sizes, RGB masks and indices outside ``classes`` are one-line DataErrors naming the file.

    Uncertainty maps are 8-bit single-channel PNGs ``<id>_uncertainty.png`` (higher = less sure) in
    ``uncertainty_dir``, by default in ``pred_dir`` where they are used when present; when used, every
    scored id needs one, of its mask's size. :func:`uncertainty_ranking` then pools all their pixels.

    Returns :func:`scores`' keys plus ``"images"``, ``"classes"``, ``"confusion"`` (rows = truth),
    ``"uncertainty"`` (the ranking, or None), ``"unpredicted"`` (truth masks left out), ``"pred"`` and
    ``"truth"``.
    """
    names = tuple(classes)
    k = len(names)
    if k < 2 or k > MAX_CLASSES:
        raise ConfigError(f"segmentation needs 2 to {MAX_CLASSES} classes, got {k}")
    share = _check_top(top)
    preds_root = _folder(pred_dir, "prediction")
    truth_root = _folder(truth_dir, "truth")
    preds = _masks_by_stem(preds_root, predictions=True)
    truths = _masks_by_stem(truth_root, predictions=False)
    if not preds:
        raise DataError(f"no predicted masks (<id>.png) in {_shown(preds_root)}")
    for key, path in preds.items():
        if key not in truths:
            raise DataError(f"{_shown(path)}: a prediction without a truth mask (no {key}.png in {_shown(truth_root)})")
    unpredicted = sorted(set(truths) - set(preds))
    if unpredicted and not only_predicted:
        raise DataError(f"{_shown(truths[unpredicted[0]])}: a truth mask without a prediction (no {unpredicted[0]}.png in "
                        f"{_shown(preds_root)}; {len(unpredicted)} of {len(truths)} truth masks have none: "
                        "score only the predicted ones with --only-predicted)")
    maps_root = preds_root if uncertainty_dir is None else _folder(uncertainty_dir, "uncertainty")
    keys = sorted(preds)
    maps = {key: maps_root / f"{key}{UNCERTAINTY_SUFFIX}.png" for key in keys}
    use_maps = uncertainty_dir is not None or any(p.is_file() for p in maps.values())
    conf = torch.zeros(k, k, dtype=torch.int64)
    errors: list[torch.Tensor] = []
    certainty: list[torch.Tensor] = []
    for key in keys:
        pred = read_mask(preds[key], k)
        truth = read_mask(truths[key], k)
        if pred.shape != truth.shape:
            raise DataError(f"{_shown(preds[key])}: prediction is {pred.shape[1]}x{pred.shape[0]} but its truth "
                            f"{_shown(truths[key])} is {truth.shape[1]}x{truth.shape[0]}")
        conf += confusion(pred, truth, k)
        if use_maps:
            path = maps[key]
            if not path.is_file():
                raise DataError(f"{_shown(path)}: missing: every prediction needs its uncertainty map once one is there")
            umap = torch.from_numpy(_index_array(path, "an uncertainty map", _MAP_HINT))
            if umap.shape != pred.shape:
                raise DataError(f"{_shown(path)}: uncertainty map is {umap.shape[1]}x{umap.shape[0]} but its "
                                f"prediction {_shown(preds[key])} is {pred.shape[1]}x{pred.shape[0]}")
            errors.append((pred != truth).reshape(-1))
            certainty.append(umap.reshape(-1))
    ranking = uncertainty_ranking(torch.cat(errors), torch.cat(certainty), share) if use_maps else None
    return {
        "images": len(keys),
        "classes": list(names),
        **scores(conf, names),
        "confusion": conf.tolist(),
        "uncertainty": ranking,
        "unpredicted": len(unpredicted),
        "pred": str(preds_root),
        "truth": str(truth_root),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_scores(result: dict[str, Any]) -> str:
    """The human-readable summary that ``difflab eval-seg`` prints: the means, then one row per class
    (IoU, Dice, share of the true pixels), then the uncertainty ranking when there is one."""
    images = f"{result['images']}"
    if result.get("unpredicted"):
        images += f" ({result['unpredicted']} truth masks without a prediction left out)"
    rows = [("images", images), ("mIoU", _fmt(result["miou"])), ("mean Dice", _fmt(result["mean_dice"])),
            ("pixel accuracy", _fmt(result["pixel_accuracy"]))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    total = sum(result["pixels"].values()) or 1
    name_width = max(len("class"), *(len(n) for n in result["classes"]))
    lines.append("")
    lines.append(f"{'class':<{name_width}}  {'IoU':>6}  {'Dice':>6}  {'pixels':>6}")
    for name in result["classes"]:
        lines.append(f"{name:<{name_width}}  {_fmt(result['iou'][name]):>6}  {_fmt(result['dice'][name]):>6}  "
                     f"{result['pixels'][name] / total:>6.1%}")
    absent = [n for n in result["classes"] if result["iou"][n] is None]
    if absent:
        lines.append(f"(-: {', '.join(absent)} in neither the truth nor the prediction, left out of the means)")
    ranking = result.get("uncertainty")
    if ranking:
        ratio = "-" if ranking["ratio"] is None else f"{ranking['ratio']:.2f}x"
        lines.append("")
        lines.append(f"uncertainty: error rate {ranking['error_rate_top']:.4f} in the {ranking['top']:.0%} most uncertain "
                     f"pixels, {ranking['error_rate_rest']:.4f} in the rest (ratio {ratio})")
    return "\n".join(lines)
