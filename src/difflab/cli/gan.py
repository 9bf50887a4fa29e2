"""``difflab gan train|sample|interpolate``: GAN runs (:mod:`difflab.gan`).

    difflab gan train --data DIR --image-size 32 --minutes 20 --out runs/gan             # StyleGAN2-style
    difflab gan train --data DIR --kind ddgan --steps 4 --out runs/ddgan                 # denoising-diffusion GAN
    difflab gan train --out runs/gan --resume --minutes 20                               # continue
    difflab gan sample --run runs/gan -n 1000 --out submission/ [--truncation 0.7]       # 1.jpg .. 1000.jpg
    difflab gan interpolate --run runs/gan --out strip.png                                # latent interpolations
    difflab eval --fake submission/ --real DIR                                           # like any image folder
"""
from __future__ import annotations

import argparse
from pathlib import Path

from difflab.cli.common import (
    Command,
    Parser,
    add_device_option,
    add_format_options,
    add_training_controls,
    check_outputs,
    choices,
    format_fields,
    is_resuming,
    nonneg_float,
    nonneg_int,
    out_file,
    out_folder,
    positive_int,
    resume_config,
    train_and_report,
    with_spilled_overrides,
)
from difflab.errors import ConfigError

SUBCOMMANDS = ("train", "sample", "interpolate")


def add_gan_train_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.gan.config import PRESETS, GANKind

    p.add_argument("--data", help="a folder of images (searched recursively) or 'fashion-mnist'")
    p.add_argument("--image-size", type=positive_int, help="training resolution: a power of two, e.g. 32 (default) or 64")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 (grey) or 3 (RGB); default: the data's own")
    p.add_argument("--kind", choices=[k.value for k in GANKind],
                   help="stylegan (default): StyleGAN2-style; ddgan: denoising-diffusion GAN (Xiao et al. 2022)")
    p.add_argument("--steps", type=positive_int, help="ddgan: denoising steps T = network calls per image (default 4)")
    p.add_argument("--preset", choices=list(PRESETS), help="network size: small (CPU, default) or default (GPU)")
    p.add_argument("--out", help="run directory to create (or continue, with --resume)")
    p.add_argument("--config", help="a TOML file with [net], [data], [train], [schedule] tables")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (one D and one G update each)")
    p.add_argument("--minutes", type=nonneg_float, help="stop after this many minutes of training (0 = no limit)")
    p.add_argument("--batch-size", type=positive_int, help="images per step")
    p.add_argument("--lr", type=float, help="learning rate of both G and D (train.lr_g / train.lr_d set them apart)")
    p.add_argument("--seed", type=int, help="training seed")
    add_training_controls(p, "train.r1_gamma=0.05 train.diffaug=translation,cutout net.width=48")


def _train_flags(args: argparse.Namespace) -> dict:
    return {
        "data.source": args.data, "data.image_size": args.image_size, "data.channels": args.channels,
        "schedule.timesteps": args.steps, "train.max_steps": args.max_steps, "train.minutes": args.minutes,
        "train.batch_size": args.batch_size, "train.lr_g": args.lr, "train.lr_d": args.lr, "train.seed": args.seed,
    }


def run_gan_train(args: argparse.Namespace) -> int:
    from difflab.config import load_toml
    from difflab.gan.config import GANKind, resolve_gan_config
    from difflab.gan.sample import read_gan_config
    from difflab.gan.trainer import GANTrainer

    if not args.out:
        raise ConfigError("gan train: --out RUN_DIR is required")
    out_folder(args.out, "--out")
    flags = _train_flags(args)
    overrides = with_spilled_overrides(args)
    resuming = is_resuming(args)
    if resuming:
        saved = read_gan_config(args.out, "--out")
        cfg = resume_config(saved, {k: v for k, v in flags.items() if v is not None}, overrides,
                            toml=load_toml(args.config) if args.config else None,
                            named=[("--preset", args.preset, saved.preset), ("--kind", args.kind, saved.kind.value)])
    else:
        if not args.data:
            raise ConfigError("gan train: --data PATH|fashion-mnist is required")
        if args.steps is not None and args.kind != GANKind.DDGAN.value:
            raise ConfigError("--steps is the number of denoising steps of --kind ddgan")
        toml = load_toml(args.config) if args.config else None
        cfg = resolve_gan_config(kind=args.kind, preset=args.preset, toml=toml, flags=flags, overrides=overrides)
    return train_and_report(GANTrainer, cfg, args, resuming)


def _add_loading(p: argparse.ArgumentParser) -> None:
    from difflab.gan.sample import SAMPLING_PRECISION
    from difflab.precision import Precision

    p.add_argument("--run", required=True, help="a run directory made by `difflab gan train`")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw generator weights")
    p.add_argument("--truncation", type=nonneg_float, default=1.0, metavar="PSI",
                   help="stylegan: truncation psi, w -> w_avg + psi (w - w_avg); 1 = none (default), 0.7 = fewer failures, "
                        "less variety")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed (seed, k): same seed, same images")
    p.add_argument("--precision", default=SAMPLING_PRECISION.value, choices=choices(Precision),
                   help=f"generator precision (default {SAMPLING_PRECISION.value}); auto = bf16 autocast where the "
                        "CPU/GPU does bf16 natively")
    add_device_option(p)


def add_gan_sample_arguments(p: argparse.ArgumentParser) -> None:
    _add_loading(p)
    p.add_argument("-n", type=positive_int, default=16, help="number of images (default 16)")
    p.add_argument("--start", type=nonneg_int, default=0, help="first image index: writes START+1 ... START+N")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", help="folder for 1.jpg ... N.jpg, and nothing else (default: RUN/samples/images); "
                                 "the record of the run goes beside it, <folder>.sampling.json")
    add_format_options(p)
    p.add_argument("--grid", help="also save a grid of the first 64 images to this file (.png or .jpg)")
    p.add_argument("--no-progress", action="store_true")


def run_gan_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from difflab.gan.config import GANKind
    from difflab.gan.sample import check_truncation, load_gan, sample_batches
    from difflab.records import write_record
    from difflab.visualize.images import save_grid, save_numbered

    grid_file = check_outputs(args)
    gan = load_gan(args.run, args.weights, args.device, args.precision)
    check_truncation(gan.config, args.truncation)
    out = Path(args.out).expanduser() if args.out else gan.path / "samples" / "images"
    kept: list[torch.Tensor] = []
    t0 = time.monotonic()
    for idx, imgs in sample_batches(gan, args.n, seed=args.seed, batch_size=args.batch_size, start=args.start,
                                    truncation=args.truncation, progress=not args.no_progress):
        save_numbered(imgs, out, idx.start, args.format, args.jpeg_quality)
        kept += list(imgs[: max(0, 64 - len(kept))])
    seconds = time.monotonic() - t0
    cfg = gan.config
    record = write_record(out, {
        "run": str(gan.path), "step": gan.step, "n": args.n, "start": args.start, "seed": args.seed,
        "weights": args.weights, "gan": cfg.kind.value, "truncation": args.truncation, "precision": args.precision,
        **format_fields(args),
        "nfe_per_image": cfg.steps, "seconds": seconds,
        **({"ddgan_steps": cfg.schedule.timesteps} if cfg.kind is GANKind.DDGAN else {}),
    }, args.start)
    if grid_file is not None:
        save_grid(torch.stack(kept), grid_file)
    print(f"wrote {args.n} images to {out} in {seconds:.1f} s ({args.n / max(seconds, 1e-9):.1f} images/s); record: {record}"
          + (f"; grid: {grid_file}" if grid_file else ""))
    return 0


def add_gan_interpolate_arguments(p: argparse.ArgumentParser) -> None:
    _add_loading(p)
    p.add_argument("--out", required=True, help="the strip figure to write (.png or .jpg)")
    p.add_argument("--rows", type=positive_int, default=4, help="interpolations, one per row (default 4)")
    p.add_argument("--frames", type=positive_int, default=8, help="images per row, both ends included (default 8)")
    p.add_argument("--scale", type=positive_int, default=2, help="pixel magnification of the figure (default 2)")


def run_gan_interpolate(args: argparse.Namespace) -> int:
    from difflab.gan.sample import interpolation_strip, load_gan
    from difflab.visualize.images import save_grid

    out = out_file(args.out, "--out", (".png", ".jpg", ".jpeg"))
    if args.frames < 2:
        raise ConfigError("--frames must be at least 2 (the two ends)")
    gan = load_gan(args.run, args.weights, args.device, args.precision)
    strip = interpolation_strip(gan, seed=args.seed, rows=args.rows, frames=args.frames, truncation=args.truncation)
    save_grid(strip, out, nrow=args.frames, scale=args.scale)
    print(f"wrote {args.rows} interpolation(s) of {args.frames} images (images 2r -> 2r+1 of seed {args.seed}) to {out}")
    return 0


_SUB = {
    "train": ("train a GAN: --kind stylegan (StyleGAN2-style, default) or ddgan (denoising-diffusion GAN)",
              add_gan_train_arguments, run_gan_train),
    "sample": ("generate 1.jpg ... N.jpg from a GAN run", add_gan_sample_arguments, run_gan_sample),
    "interpolate": ("a figure of latent interpolations, one per row", add_gan_interpolate_arguments, run_gan_interpolate),
}


def add_gan_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="gan_command", metavar="SUBCOMMAND", parser_class=Parser)
    for name, (help_, add, _) in _SUB.items():
        add(sub.add_parser(name, help=help_, description=help_))


def run_gan(args: argparse.Namespace) -> int:
    if not args.gan_command:
        raise ConfigError(f"gan: choose a sub-command: {', '.join(SUBCOMMANDS)} (difflab gan --help)")
    return _SUB[args.gan_command][2](args)


COMMANDS: dict[str, Command] = {
    "gan": ("train, sample and interpolate GANs (StyleGAN2-style and denoising-diffusion GAN)", add_gan_arguments, run_gan),
}
