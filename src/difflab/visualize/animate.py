"""The reverse process as an animated GIF (Pillow only): a few samples side by side, one frame per
kept state of a :class:`~difflab.visualize.progress.Trajectory`, with the timestep in a header."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from difflab.data.dataset import to_uint8
from difflab.errors import ConfigError
from difflab.io import atomic_path
from difflab.visualize.images import make_grid, to_pil
from difflab.visualize.progress import Trajectory, sampler_name

HEADER = 22  # pixels of the caption band above the images (plus a 3 px progress bar)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ValueError, OSError):  # older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def animation_frames(traj: Trajectory, *, scale: int = 3, show_x0: bool = False, padding: int = 2) -> list[Image.Image]:
    """One Pillow image per kept state: the ``n`` states side by side (and, with ``show_x0``, the
    predicted x_0 in a second row), scaled ``scale`` x with nearest-neighbour, under a caption."""
    if scale < 1:
        raise ConfigError(f"--scale must be a positive integer, got {scale}")
    n = traj.x.shape[1]
    font = _font(12)
    name = sampler_name(traj.sampler, traj.num_steps)
    frames = []
    for k in range(traj.frames):
        imgs = traj.x[k] if not show_x0 else torch.cat([traj.x[k], traj.x0[k]])
        tile = to_pil(make_grid(to_uint8(imgs), nrow=n, padding=padding))
        if scale > 1:
            tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
        tile = tile.convert("RGB")
        frame = Image.new("RGB", (tile.width, tile.height + HEADER + 3), "white")
        frame.paste(tile, (0, HEADER + 3))
        draw = ImageDraw.Draw(frame)
        where = "x_0 (sample)" if traj.t[k] is None else f"t = {traj.t[k]:.0f}"
        draw.text((4, HEADER // 2), f"{where}   step {traj.step[k]}/{traj.num_steps}", fill="black", font=font, anchor="lm")
        if frame.width > 260:
            draw.text((frame.width - 4, HEADER // 2), name, fill=(90, 90, 90), font=font, anchor="rm")
        done = round(frame.width * traj.step[k] / traj.num_steps)
        draw.rectangle([0, HEADER, frame.width - 1, HEADER + 2], fill=(225, 225, 225))
        if done:
            draw.rectangle([0, HEADER, done - 1, HEADER + 2], fill=(40, 110, 200))
        frames.append(frame)
    return frames


def save_gif(frames: list[Image.Image], path: str | os.PathLike[str], *, duration_ms: int = 100,
             hold_ms: int = 1500, loop: int = 0) -> Path:
    """Write ``frames`` as an animated GIF (atomically): ``duration_ms`` each, the last one shown
    ``hold_ms``; ``loop=0`` repeats forever."""
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ConfigError(f"--out {path}: the animation is written as a .gif")
    if duration_ms < 1 or hold_ms < 1:
        raise ConfigError("--duration and --hold must be at least 1 ms")
    durations = [duration_ms] * (len(frames) - 1) + [hold_ms]
    # one palette for every frame, from the noise, the middle and the sample together, so that
    # colours do not flicker between frames
    picks = [frames[0], frames[len(frames) // 2], frames[-1]]
    sheet = Image.new("RGB", (picks[0].width, sum(f.height for f in picks)))
    for k, f in enumerate(picks):
        sheet.paste(f, (0, k * f.height))
    palette = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    quantised = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    with atomic_path(path) as tmp:
        quantised[0].save(tmp, format="GIF", save_all=True, append_images=quantised[1:], duration=durations,
                          loop=loop, optimize=False, disposal=1)
    return path
