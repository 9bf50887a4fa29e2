"""Bring your own model: import networks trained with other libraries into difflab runs, export difflab runs
to diffusers.

- :mod:`~difflab.interop.diffusers_import`: a diffusers ``save_pretrained`` folder (``UNet2DModel`` + a
  scheduler config) -> a difflab run whose network is diffusers' own module
  (:class:`~difflab.models.diffusers_unet.DiffusersUNet`), schedule and parametrisation mapped;
- :mod:`~difflab.interop.ddpm_pytorch`: a denoising-diffusion-pytorch ``Trainer`` checkpoint (``model-N.pt``,
  read with ``torch.load(weights_only=True)``) and the stated architecture -> a difflab run with the EMA
  weights in difflab's rebuild of its ``Unet`` (:mod:`difflab.models.ddpm_pytorch_unet`);
- :mod:`~difflab.interop.diffusers_export`: a difflab run -> a diffusers pipeline folder (``unet/`` +
  ``scheduler/`` + ``model_index.json``), when its UNet maps onto diffusers' blocks;
- :mod:`~difflab.interop.common`: the imported model record and the writing of its run directory.

What does not map is refused in one line naming the setting; see each module.
"""
from difflab.interop.common import ImportedModel, write_imported_run

__all__ = ["ImportedModel", "write_imported_run"]
