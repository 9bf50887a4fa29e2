"""``difflab train-autoencoder``: the KL autoencoder of latent diffusion (:mod:`difflab.autoencoder`).

    difflab train-autoencoder --data DIR --image-size 64 --out runs/ae --minutes 30          # 4x smaller latents
    difflab train-autoencoder --data DIR --downsample 8 --disc --out runs/ae8                 # 8x, with the PatchGAN
    difflab train-autoencoder --out runs/ae --resume --minutes 30                             # continue

The run's ``report.json`` holds the latent statistics and the held-out reconstruction PSNR (and FID).
"""
from __future__ import annotations

import argparse

from difflab.cli.common import (
    Command,
    add_training_controls,
    is_resuming,
    nonneg_float,
    nonneg_int,
    out_folder,
    positive_int,
    resume_config,
    train_and_report,
    with_spilled_overrides,
)
from difflab.errors import ConfigError

DISC_WEIGHT = 0.5  # --disc


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.autoencoder.config import DOWNSAMPLES

    p.add_argument("--data", help="a folder of images (searched recursively) or 'fashion-mnist'")
    p.add_argument("--image-size", type=positive_int, help="training resolution, a multiple of --downsample (default 32)")
    p.add_argument("--latent-channels", type=positive_int, help="channels of the latent (default 4)")
    p.add_argument("--downsample", type=int, choices=list(DOWNSAMPLES),
                   help="the latent is 1/4 (default) or 1/8 of the image size")
    p.add_argument("--disc", action="store_true",
                   help=f"add the PatchGAN discriminator loss (loss.disc_weight={DISC_WEIGHT}, from step loss.disc_start)")
    p.add_argument("--out", help="run directory to create (or continue, with --resume)")
    p.add_argument("--config", help="a TOML file with [net], [data], [loss], [train] tables")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps")
    p.add_argument("--minutes", type=nonneg_float, help="stop after this many minutes of training (0 = no limit)")
    p.add_argument("--batch-size", type=positive_int, help="images per step")
    p.add_argument("--lr", type=float, help="learning rate of the autoencoder and the discriminator")
    p.add_argument("--seed", type=int, help="training seed")
    p.add_argument("--holdout", type=nonneg_int,
                   help="the last N images of the data are never trained on; the final report measures them (default 500)")
    add_training_controls(p, "net.width=48 loss.kl_weight=1e-5 train.sample_every=200")


def _flags(args: argparse.Namespace) -> dict:
    return {
        "data.source": args.data, "data.image_size": args.image_size, "net.latent_channels": args.latent_channels,
        "net.downsample": args.downsample, "loss.disc_weight": DISC_WEIGHT if args.disc else None,
        "train.max_steps": args.max_steps, "train.minutes": args.minutes, "train.batch_size": args.batch_size,
        "train.lr": args.lr, "train.seed": args.seed, "train.holdout": args.holdout,
    }


def run(args: argparse.Namespace) -> int:
    from difflab.autoencoder.config import resolve_autoencoder_config
    from difflab.autoencoder.load import read_autoencoder_config
    from difflab.autoencoder.trainer import AutoencoderTrainer
    from difflab.config import load_toml

    if not args.out:
        raise ConfigError("train-autoencoder: --out RUN_DIR is required")
    out_folder(args.out, "--out")
    flags = _flags(args)
    overrides = with_spilled_overrides(args)
    toml = load_toml(args.config) if args.config else None
    resuming = is_resuming(args)
    if resuming:
        saved = read_autoencoder_config(args.out, "--out")
        cfg = resume_config(saved, {k: v for k, v in flags.items() if v is not None}, overrides, toml=toml)
    else:
        if not args.data:
            raise ConfigError("train-autoencoder: --data PATH|fashion-mnist is required")
        cfg = resolve_autoencoder_config(toml=toml, flags=flags, overrides=overrides)
    return train_and_report(AutoencoderTrainer, cfg, args, resuming)


COMMANDS: dict[str, Command] = {
    "train-autoencoder": ("train a KL autoencoder (latent diffusion's first stage): L1 + KL, optional PatchGAN",
                          add_arguments, run),
}
