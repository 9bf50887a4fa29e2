"""Training curves from a run's ``log.jsonl``: the loss against step, and the loss per timestep quartile.

Each log record (``difflab.train.loop``) averages the per-example loss over the ``log_every``
steps before it, overall (``loss``) and per quarter of the timestep range (``loss_quartiles``:
t in [0, T/4), ..., [3T/4, T)). With eps-prediction the low-t quarter carries the largest loss
(there the noise is a small perturbation of the image and hard to tell apart from it) and the
high-t quarter the smallest, so the overall curve hides four rather different ones.

A resumed run re-logs the steps after its last checkpoint; the later records win.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflab.errors import DataError


@dataclass(frozen=True)
class TrainingLog:
    step: np.ndarray  # (R,) int
    loss: np.ndarray  # (R,) float
    quartiles: np.ndarray  # (R, 4) float, NaN where a quartile saw no examples
    lr: np.ndarray  # (R,) float, NaN where missing
    images_per_s: np.ndarray  # (R,) float, NaN where missing
    path: Path

    def __len__(self) -> int:
        return len(self.step)


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def read_log(path: str | os.PathLike[str]) -> TrainingLog:
    """Parse a ``log.jsonl``; a damaged line is an error naming the file and line (except a torn
    last line, which a crash mid-write can leave and which is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: the run has not logged a step yet (log_every steps)")
    lines = path.read_text(errors="replace").splitlines()
    records: list[dict] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            step, loss = int(r["step"]), float(r["loss"])
        except (ValueError, KeyError, TypeError):
            if no == len(lines):
                continue
            raise DataError(f"{path}:{no}: not a training log record (need JSON with 'step' and 'loss')") from None
        while records and records[-1]["step"] >= step:  # a resume: drop what the restarted run redoes
            records.pop()
        r["step"], r["loss"] = step, loss
        records.append(r)
    if not records:
        raise DataError(f"{path} holds no training log records")
    q = np.full((len(records), 4), np.nan)
    for k, r in enumerate(records):
        vals = r.get("loss_quartiles") or []
        for j in range(min(4, len(vals))):
            q[k, j] = _num(vals[j])
    return TrainingLog(
        step=np.array([r["step"] for r in records]), loss=np.array([r["loss"] for r in records], dtype=float),
        quartiles=q, lr=np.array([_num(r.get("lr")) for r in records]),
        images_per_s=np.array([_num(r.get("images_per_s")) for r in records]), path=path,
    )


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): weight 0 is the raw curve.
    NaNs are skipped (they keep the previous average)."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.full(len(values), np.nan)
    avg, norm = 0.0, 0.0
    for k, v in enumerate(values):
        if not math.isnan(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        if norm > 0:
            out[k] = avg / norm
    return out


def smooth_positive(values: np.ndarray, weight: float) -> np.ndarray:
    """:func:`smooth` in log space (a geometric moving average) when every value is positive: a
    loss that falls by orders of magnitude is then not dragged up by its first, large values."""
    finite = values[~np.isnan(values)]
    if len(finite) and (finite > 0).all():
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.exp(smooth(np.log(values), weight))
    return smooth(values, weight)


def curves_figure(log: TrainingLog, *, num_timesteps: int | None = None, smoothing: float = 0.8, title: str | None = None):
    """Left: the loss against step (raw, faint; smoothed, bold). Right: the smoothed loss per
    timestep quartile. Both on a log y-axis when the loss spans more than a factor of 3; the
    smoothing is a debiased EMA of log(loss) (:func:`smooth_positive`)."""
    from matplotlib.ticker import MaxNLocator

    from difflab.visualize.figure import new_figure, plain_log_axis

    fig = new_figure(11, 4.2)
    ax_l, ax_q = fig.subplots(1, 2)
    (line,) = ax_l.plot(log.step, log.loss, lw=0.8, alpha=0.35, label="logged (mean over log_every steps)")
    ax_l.plot(log.step, smooth_positive(log.loss, smoothing), lw=2, color=line.get_color(),
              label=f"smoothed (EMA {smoothing:g} of log loss)")
    ax_l.set(xlabel="optimizer step", ylabel="training loss (per-example mean)", title="Training loss")
    T = num_timesteps
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"]
    for j in range(4):
        col = log.quartiles[:, j]
        if np.isnan(col).all():
            continue
        rng = f"t in [{j * T // 4}, {(j + 1) * T // 4})" if T else f"quartile {j + 1} of t"
        ax_q.plot(log.step, col, lw=0.7, alpha=0.3, color=colors[j])
        ax_q.plot(log.step, smooth_positive(col, smoothing), lw=2, color=colors[j], label=rng)
    ax_q.set(xlabel="optimizer step", ylabel="training loss (per-example mean)",
             title="Loss by timestep quartile (low t = little noise)")
    values = np.r_[log.loss, log.quartiles.ravel()]
    lo, hi = np.nanmin(values), np.nanmax(values)
    for ax in (ax_l, ax_q):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if lo > 0 and hi / lo > 3:  # a log axis once the loss spans more than a factor of 3
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis, lo, hi)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if len(log) == 1:  # one point: make it visible
        for ax in (ax_l, ax_q):
            for ln in ax.get_lines():
                ln.set_marker("o")
    fig.suptitle(title or f"{log.path.parent.name}: {len(log)} log records, steps {log.step[0]}-{log.step[-1]}",
                 fontsize=11)
    fig.tight_layout()
    return fig
