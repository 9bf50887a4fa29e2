"""The forward process in pictures: one image noised to chosen timesteps, and the schedules compared.

``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (:meth:`NoiseSchedule.q_sample`). A strip uses
**one** noise draw ``eps`` for every t and every schedule, so the columns differ only in how much
of that noise each abar_t lets in: the pictures compare schedules, not noise samples.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.schedule import BetaSchedule, NoiseSchedule

DEFAULT_TIMESTEPS = (0, 50, 100, 200, 300, 400, 500, 600, 800, 999)


def parse_timesteps(text: str, num_timesteps: int, flag: str = "--timesteps") -> list[int]:
    """``"0,50,100"`` -> [0, 50, 100]; every entry an integer in [0, T - 1]."""
    try:
        ts = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    bad = [t for t in ts if not 0 <= t < num_timesteps]
    if bad:
        raise ConfigError(f"{flag}: timesteps must lie in [0, {num_timesteps - 1}] for T = {num_timesteps}, got {bad}")
    return ts


def parse_schedules(text: str, num_timesteps: int, flag: str = "--schedule") -> dict[str, NoiseSchedule]:
    """``"linear,cosine"`` -> {name: schedule}; names are :class:`BetaSchedule` values."""
    names = [s.strip() for s in text.split(",")]
    if not names or any(not n for n in names):
        raise ConfigError(f"{flag} must be a comma-separated list of schedules, got {text!r}")
    out: dict[str, NoiseSchedule] = {}
    for name in names:
        try:
            out[name] = NoiseSchedule.from_name(name, num_timesteps)
        except ConfigError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return out


def noised(x0: Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], noise: Tensor) -> Tensor:
    """x_t of one image ``x0`` (C, H, W) at each of ``timesteps`` with the same ``noise``: (len(ts), C, H, W)."""
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    x = x0.unsqueeze(0).expand(len(t), *x0.shape)
    return schedule.q_sample(x, t, noise.unsqueeze(0).expand_as(x))


def noise_strip_figure(x0: Tensor, schedules: dict[str, NoiseSchedule], timesteps: Sequence[int], *, seed: int = 0):
    """One row per schedule: the original image, then x_t for each t, titled with t, abar_t and
    the signal-to-noise ratio in dB. ``x0`` is (C, H, W) in [-1, 1]."""
    from difflab.data.dataset import to_uint8
    from difflab.visualize.figure import image_grid_figure

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)
    rows, titles = [], []
    for sched in schedules.values():
        xt = noised(x0, sched, timesteps, noise)
        rows.append(to_uint8(torch.cat([x0.unsqueeze(0), xt])))
        ab = sched.alphas_cumprod
        titles.append(["original x_0"] + [f"t={t}\nᾱ={float(ab[t]):.3f}\nSNR {_db(float(sched.snr[t]))}" for t in timesteps])
    T = next(iter(schedules.values())).num_timesteps
    return image_grid_figure([torch.stack(rows)], titles=titles, row_titles=list(schedules),
                             panel_titles=[f"Forward process x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, T = {T}, one ε for all"])


def _db(snr: float) -> str:
    return f"{round(10 * math.log10(snr)):+d} dB"


def schedules_figure(num_timesteps: int = 1000, kinds: Sequence[str | BetaSchedule] | None = None):
    """alpha-bar against t (left) and SNR = abar / (1 - abar) on a log axis (right), one line per schedule."""
    from difflab.visualize.figure import new_figure

    chosen = [BetaSchedule(k) for k in (kinds or list(BetaSchedule))]
    fig = new_figure(11, 4.2)
    ax_a, ax_s = fig.subplots(1, 2)
    t = torch.arange(num_timesteps).numpy()
    for kind in chosen:
        s = NoiseSchedule.from_name(kind, num_timesteps)
        ax_a.plot(t, s.alphas_cumprod.numpy(), label=kind.value, lw=1.8)
        ax_s.plot(t, s.snr.numpy(), label=kind.value, lw=1.8)
    ax_a.set(xlabel="timestep t", ylabel="ᾱ_t  (fraction of signal variance kept)", ylim=(-0.02, 1.02),
             xlim=(0, num_timesteps - 1), title="Signal kept: ᾱ_t = ∏ (1 - β_s)")
    ax_s.set_yscale("log")
    ax_s.set(xlabel="timestep t", ylabel="SNR(t) = ᾱ_t / (1 - ᾱ_t)  (log scale)", xlim=(0, num_timesteps - 1),
             title="Signal-to-noise ratio")
    ax_s.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax_s.text(num_timesteps * 0.98, 1.25, "SNR = 1", ha="right", va="bottom", fontsize=8, color="0.4")
    for ax in (ax_a, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(title="schedule", fontsize=8, title_fontsize=8)
    fig.suptitle(f"Noise schedules, T = {num_timesteps}", fontsize=11)
    fig.tight_layout()
    return fig


def load_image(path: str | os.PathLike[str], size: int | None, channels: int) -> Tensor:
    """An image file as a (C, H, W) float tensor in [-1, 1], centre-cropped and resized to ``size``."""
    import numpy as np

    from difflab.data.dataset import to_float
    from difflab.data.decode import open_image, resize_center_crop

    img = open_image(path, channels=channels)
    if size:
        img = resize_center_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return to_float(torch.from_numpy(np.ascontiguousarray(arr)))
