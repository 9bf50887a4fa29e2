"""The KL autoencoder of latent diffusion (Rombach et al. 2022), sharing data loading, EMA, checkpoints
and CLI conventions with the diffusion models and GANs.

* :mod:`~difflab.autoencoder.model`: :class:`Autoencoder` (``encode`` -> (mean, logvar), ``decode``,
  ``latent_shape``), :func:`kl`, the PatchGAN :class:`PatchDiscriminator` and its hinge losses;
* :mod:`~difflab.autoencoder.trainer` (:class:`AutoencoderTrainer`): L1 + KL (+ adaptive-weight GAN) training,
  held-out images, ``report.json``;
* :mod:`~difflab.autoencoder.report`: :func:`latent_stats`, :func:`reconstruct`, PSNR and reconstruction FID;
* :mod:`~difflab.autoencoder.load` (:func:`load_autoencoder`), :mod:`~difflab.autoencoder.config`.

The command line is ``difflab train-autoencoder`` (:mod:`difflab.cli.autoencoder`).
"""
from __future__ import annotations

from difflab.autoencoder.config import AutoencoderConfig, is_autoencoder_config, resolve_autoencoder_config
from difflab.autoencoder.load import load_autoencoder, read_autoencoder_config
from difflab.autoencoder.model import Autoencoder, PatchDiscriminator, kl
from difflab.autoencoder.report import latent_stats, reconstruct
from difflab.autoencoder.trainer import AutoencoderTrainer

__all__ = ["Autoencoder", "AutoencoderConfig", "AutoencoderTrainer", "PatchDiscriminator", "is_autoencoder_config",
           "kl", "latent_stats", "load_autoencoder", "read_autoencoder_config", "reconstruct",
           "resolve_autoencoder_config"]
