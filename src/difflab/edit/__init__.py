"""Image-to-image on a trained run: inputs read and fitted to the run (:mod:`.inputs`), masks
(:mod:`.masks`) and inpainting with RePaint's resampling (:mod:`.inpaint`). SDEdit itself is a start
option of the sampling driver (:func:`difflab.samplers.sample_batches` with ``init`` and
``strength``), so every sampler runs it unchanged."""
from __future__ import annotations

from difflab.edit.inpaint import inpaint_batches, repaint_path
from difflab.edit.inputs import Inputs, load_inputs
from difflab.edit.masks import MaskKind, downsample_mask, load_mask, make_mask

__all__ = ["Inputs", "MaskKind", "downsample_mask", "inpaint_batches", "load_inputs", "load_mask", "make_mask", "repaint_path"]
