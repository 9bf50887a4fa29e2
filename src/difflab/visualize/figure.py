"""matplotlib without pyplot: a fresh ``Figure`` on the Agg canvas, saved atomically as a compact PNG.

No ``pyplot`` and no ``matplotlib.use``: every figure is an object with its own non-interactive
canvas, so nothing here touches global matplotlib state (DEVELOPERS.md: no hidden globals).

:func:`image_grid_figure` lays images out at exact pixel positions (``cell`` pixels per image,
fixed margins for titles), so a figure's size follows from its rows and columns alone
(:class:`GridLayout`); that is what the tests check.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.errors import ConfigError
from difflab.io import atomic_path

DPI = 100


def new_figure(width_in: float, height_in: float, dpi: int = DPI):
    """A ``matplotlib.figure.Figure`` of the given size (inches) on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig) -> Image.Image:
    """Render ``fig`` to a Pillow image: mode ``L`` when every pixel is grey, else ``RGB``."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    rgb = rgba[:, :, :3]
    if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all():
        return Image.fromarray(np.ascontiguousarray(rgb[:, :, 0]))
    return Image.fromarray(np.ascontiguousarray(rgb))


def save_figure(fig, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as PNG, written atomically (grey figures as 8-bit grey: about 3x smaller)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path}: figures are written as .png")
    img = figure_to_image(fig)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path


def plain_log_axis(axis, lo: float, hi: float) -> None:
    """Tick labels of a log-scaled matplotlib axis as plain numbers (0.01, 20, 1000, not 10^-2), with
    labelled minor ticks too when the data span less than ~1.5 decades (else only the decades)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain if hi / lo < 30 else NullFormatter())


# -- grids of images with titles ------------------------------------------------------------
@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of :func:`image_grid_figure`: each panel is ``rows x cols`` cells of ``cell`` px."""

    rows: int
    cols: int
    cell: int
    panels: int = 1
    cell_titles: bool = False  # a title above every cell, not only above the first row
    row_titles: bool = False
    gap: int = 4  # between cells
    title: int = 28  # height of the title band above a row of cells (pixels; two lines of 7.5 pt text)
    panel_title: int = 22  # above each panel
    row_title: int = 64  # left of the cells, when there are row titles
    margin: int = 8

    @property
    def row_pitch(self) -> int:
        return self.cell + self.gap + (self.title if self.cell_titles else 0)

    @property
    def panel_height(self) -> int:
        return self.panel_title + self.title + (self.rows - 1) * self.row_pitch + self.cell

    def cell_box(self, panel: int, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) pixels of one image cell in the saved figure."""
        left = self.margin + (self.row_title if self.row_titles else 0) + col * (self.cell + self.gap)
        top = self.margin + panel * (self.panel_height + self.margin) + self.panel_title + self.title + row * self.row_pitch
        return left, top, left + self.cell, top + self.cell

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the saved image in pixels."""
        width = 2 * self.margin + (self.row_title if self.row_titles else 0) + self.cols * (self.cell + self.gap) - self.gap
        height = 2 * self.margin + self.panels * self.panel_height + (self.panels - 1) * self.margin
        return width, height


def cell_size(image_size: int, minimum: int = 64) -> int:
    """Pixels per image in a figure: the image scaled by a whole factor to at least ``minimum``."""
    return image_size * max(1, -(-minimum // image_size))


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """A uint8 (C, H, W) tensor as an (H, W) or (H, W, 3) numpy array for ``imshow``."""
    arr = image.detach().cpu().permute(1, 2, 0).numpy()
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def image_grid_figure(
    panels: Sequence[torch.Tensor],
    *,
    titles: Sequence[str] | Sequence[Sequence[str]],
    panel_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    cell: int | None = None,
    fontsize: float = 7.5,
):
    """One figure of ``len(panels)`` panels stacked vertically; panel ``p`` is a uint8 tensor
    (rows, cols, C, H, W) drawn as a grid, each image ``cell`` pixels square (nearest-neighbour).

    ``titles`` is one string per column (drawn above the first row of every panel) or, as a list
    of per-row lists, one string per cell (drawn above each cell); ``row_titles[i]`` goes left of
    row i. The saved size is :attr:`GridLayout.size` of the returned layout (``fig.layout``).
    """
    if not panels:
        raise ValueError("image_grid_figure needs at least one panel")
    rows, cols, _, h, w = panels[0].shape
    if any(tuple(p.shape[:2]) != (rows, cols) for p in panels):
        raise ValueError("every panel must have the same rows and columns")
    per_cell = len(titles) > 0 and not isinstance(titles[0], str)
    cell_titles = [list(r) for r in titles] if per_cell else [list(titles)] + [[""] * cols] * (rows - 1)
    if len(cell_titles) != rows or any(len(r) != cols for r in cell_titles):
        raise ValueError(f"titles do not match a grid of {rows} rows and {cols} columns")
    cell = cell or cell_size(max(h, w))
    widest = max((len(r) for r in row_titles), default=0) if row_titles is not None else 0
    lines = max((t.count("\n") + 1 for r in cell_titles for t in r if t), default=1)
    lay = GridLayout(rows=rows, cols=cols, cell=cell, panels=len(panels), cell_titles=per_cell,
                     row_titles=row_titles is not None, row_title=max(40, round(6 * widest * fontsize / 7.5) + 12),
                     title=round(lines * 1.45 * fontsize) + 6)
    W, H = lay.size
    fig = new_figure((W + 1e-6) / DPI, (H + 1e-6) / DPI)  # Agg truncates to whole pixels: keep W x H
    fig.layout = lay

    def rect(x: float, y_top: float, w_px: float, h_px: float) -> list[float]:  # pixels from the top left
        return [x / W, 1 - (y_top + h_px) / H, w_px / W, h_px / H]

    for p, panel in enumerate(panels):
        y = lay.margin + p * (lay.panel_height + lay.margin)
        if panel_titles is not None:
            fig.text(lay.margin / W, 1 - (y + lay.panel_title / 2) / H, panel_titles[p], ha="left", va="center",
                     fontsize=9, fontweight="bold")
        for i in range(rows):
            for j in range(cols):
                left, top, _, _ = lay.cell_box(p, i, j)
                ax = fig.add_axes(rect(left, top, cell, cell))
                img = to_hwc(panel[i, j])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest",
                          aspect="auto")
                ax.set_axis_off()
                if cell_titles[i][j]:
                    ax.set_title(cell_titles[i][j], fontsize=fontsize, pad=2, linespacing=1.1)
            if row_titles is not None:
                left, top, _, _ = lay.cell_box(p, i, 0)
                fig.text((left - 6) / W, 1 - (top + cell / 2) / H, row_titles[i], ha="right", va="center",
                         fontsize=fontsize + 0.5)
    return fig
