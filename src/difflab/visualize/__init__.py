"""Seeing the process: pictures of the forward (noising) and reverse (denoising) processes,
training curves and a sampler comparison. Figures use matplotlib's Agg canvas (no pyplot, no
global state); images and GIFs use Pillow.

Commands (:mod:`difflab.cli.visualize`): ``noise``, ``progress``, ``animate``, ``curves``,
``compare``. See ``docs/how-diffusion-works.md`` for a walk-through on a real run.
"""
from difflab.visualize.progress import Trajectory, frame_indices, record_trajectory

__all__ = ["Trajectory", "frame_indices", "record_trajectory"]
