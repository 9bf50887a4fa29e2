"""GANs beside the diffusion models, sharing their data loading, EMA, checkpoints and CLI conventions.

* :mod:`~difflab.gan.stylegan`: a compact StyleGAN2 (mapping network, modulated and demodulated
  convolutions, noise inputs, style mixing, skip generator, residual discriminator with minibatch stddev);
* :mod:`~difflab.gan.ddgan`: the denoising-diffusion GAN of Xiao et al. 2022 on :mod:`difflab.schedule`;
* :mod:`~difflab.gan.losses` (non-saturating logistic loss, R1), :mod:`~difflab.gan.diffaug` (DiffAugment);
* :mod:`~difflab.gan.trainer` (:class:`GANTrainer`), :mod:`~difflab.gan.sample` (loading and sampling a run);
* :mod:`~difflab.gan.config` (:class:`GANConfig`, presets ``small`` and ``default``).

The command line is ``difflab gan train|sample|interpolate`` (:mod:`difflab.cli.gan`).
"""
from __future__ import annotations

from difflab.gan.config import GANConfig, GANKind, resolve_gan_config
from difflab.gan.sample import LoadedGAN, generate, load_gan, sample_batches

__all__ = ["GANConfig", "GANKind", "LoadedGAN", "generate", "load_gan", "resolve_gan_config", "sample_batches"]
