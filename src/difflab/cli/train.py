"""``difflab train`` and ``difflab demo``."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from difflab.cli.common import (
    Command,
    add_device_option,
    add_training_controls,
    is_resuming,
    nonneg_float,
    out_folder,
    positive_int,
    resume_config,
    run_in_procs,
    train_and_report,
    with_spilled_overrides,
)
from difflab.errors import ConfigError

if TYPE_CHECKING:
    from difflab.config import RunConfig


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.config import preset_names
    from difflab.recipes import RECIPES

    p.add_argument("--data", help="a folder of images (searched recursively) or 'fashion-mnist'")
    p.add_argument("--image-size", type=positive_int, help="training resolution in pixels (default 32)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 (grey) or 3 (RGB); default: the data's own")
    p.add_argument("--labels", metavar="classes|folders|FILE.csv",
                   help="train a conditional model: the built-in data set's classes, one sub-folder per class, or a CSV "
                        "of image,attribute... rows (e.g. id,hair,eyes)")
    p.add_argument("--captions", action="store_true",
                   help="condition on text instead: captions built from the labels, embedded by cond.text_encoder "
                        "(needs the [text] extra); sample with --prompt")
    p.add_argument("--task", choices=["generate", "upscale", "segment"], default=None,
                   help="generate (default): a model that makes images; upscale: a super-resolution model that makes the "
                        "--image-size image from its --from version (SR3; use with difflab upscale or sample --upscale-run); "
                        "segment: a model whose sample is the segmentation mask of an image (SegDiff), trained on a "
                        "paired folder (--data with images/, masks/, classes.txt; use with difflab segment)")
    p.add_argument("--from", dest="from_size", type=positive_int, metavar="SIZE",
                   help="--task upscale: the low resolution it upscales from, e.g. 32 (training pairs are made on the fly)")
    p.add_argument("--objective", choices=["diffusion", "ce"],
                   help="--task segment: diffusion (default: the mask is sampled, SegDiff) or ce (the plain segmenter "
                        "baseline: the same UNet, one pass, cross-entropy)")
    p.add_argument("--latent-of", metavar="AE_RUN",
                   help="latent diffusion: train on the latents of this autoencoder run (difflab train-autoencoder); the "
                        "data is encoded once, the image size is the autoencoder's, and difflab sample decodes to images")
    p.add_argument("--out", help="run directory to create (or continue, with --resume)")
    p.add_argument("--config", help="a TOML file with [model], [schedule], [loss], [data], [train], [sampler] tables")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="a complete training recipe (network, objective, optimiser, EMA, augmentation, default "
                        "sampler); default best unless --preset or --config is given; other options still override "
                        "it: "
                        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
    p.add_argument("--preset", choices=preset_names(), help="network size preset (default: small, or the recipe's)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument("--minutes", type=nonneg_float, help="stop after this many minutes of training (0 = no limit)")
    p.add_argument("--batch-size", type=positive_int, help="images per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="training seed")
    p.add_argument("--procs", type=positive_int, default=1, metavar="N",
                   help="train with N data-parallel processes on this machine (what torchrun --standalone "
                        "--nproc_per_node N would start; the same global batch and draws as one process; each gets "
                        "cores/N threads): on a 2-core CPU, --procs 2 trains 1.10x faster (BENCHMARKS.md)")
    add_training_controls(p, "train.lr=1e-4 schedule.kind=cosine model.dropout=0")


def _train_flags(args: argparse.Namespace) -> dict:
    if getattr(args, "task", None) == "upscale" and not args.from_size:
        raise ConfigError("--task upscale needs --from SIZE, the resolution it upscales from (e.g. --from 32)")
    if getattr(args, "from_size", None) and args.task != "upscale":
        raise ConfigError("--from is for --task upscale (a super-resolution run)")
    latent = _latent_flags(args) if getattr(args, "latent_of", None) else {}
    return {
        **latent, **_segment_flags(args),
        "upscale.from_size": getattr(args, "from_size", None),
        "data.source": args.data, "data.image_size": args.image_size, "data.channels": args.channels,
        "data.labels": args.labels, "cond.captions": True if args.captions else None,
        "train.max_steps": args.max_steps, "train.minutes": args.minutes, "train.batch_size": args.batch_size,
        "train.lr": args.lr, "train.seed": args.seed,
    }


def _segment_flags(args: argparse.Namespace) -> dict:
    """``--task segment``: the class names from the paired folder's classes.txt (no image decoded), and
    ``--objective``."""
    from pathlib import Path

    from difflab.data.paired import read_classes
    from difflab.errors import DataError

    task, objective = getattr(args, "task", None), getattr(args, "objective", None)
    if objective is not None and task != "segment":
        raise ConfigError("--objective is for --task segment (a segmentation run)")
    if task != "segment" or not args.data:
        return {"segment.objective": objective}
    classes = Path(args.data).expanduser() / "classes.txt"
    if not classes.is_file():
        raise DataError(f"--task segment: --data {args.data} is not a paired folder (images/, masks/ and classes.txt, "
                        "one 'index name' line per class)")
    return {"segment.classes": read_classes(classes), "segment.objective": objective}


def _latent_flags(args: argparse.Namespace) -> dict:
    """``--latent-of``: the latent.* settings and the autoencoder's image size (a different --image-size or
    --channels is one line)."""
    from difflab.latent import latent_settings

    if getattr(args, "task", None) == "upscale":
        raise ConfigError("--latent-of and --task upscale cannot be combined (super-resolution runs are pixel-space)")
    found = latent_settings(args.latent_of)
    size = found["data.image_size"]
    if args.image_size is not None and args.image_size != size:
        raise ConfigError(f"--image-size {args.image_size}: the autoencoder {args.latent_of} works at {size} px "
                          "(leave --image-size out)")
    if args.channels is not None and args.channels != 3:
        raise ConfigError(f"--channels {args.channels}: the autoencoder {args.latent_of} takes RGB images")
    args.image_size, args.channels = size, 3
    return found


def _recipe(args: argparse.Namespace) -> str | None:
    """--recipe, or ``best`` when nothing else chooses the network and recipe (no --preset, --config,
    nor --task upscale): measured better than the plain ``small`` preset (BENCHMARKS.md, the ladder)."""
    if args.recipe or args.preset or args.config or getattr(args, "task", None) == "upscale":
        return args.recipe
    return "best"


def _conditioned(cfg: RunConfig) -> RunConfig:
    """The config with the data's label names and the network's condition inputs filled in (reads the
    label file or the folder names, decodes no image; loads the text encoder for its size)."""
    from difflab.config import condition_model
    from difflab.data.dataset import label_schema

    if cfg.cond.captions and cfg.data.labels == "none":
        raise ConfigError("--captions builds captions from labels: give --labels too")
    schema = label_schema(cfg.data.source, cfg.data.labels)
    text_dim = 0
    if schema is not None and cfg.cond.captions:
        from difflab.text import TextEncoder

        text_dim = TextEncoder(cfg.cond.text_encoder).dim
    return condition_model(cfg, schema, text_dim)


def _resume_config(saved: RunConfig, args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    from difflab.config import load_toml

    return resume_config(saved, {k: v for k, v in _train_flags(args).items() if v is not None}, overrides,
                         toml=load_toml(args.config) if args.config else None,
                         named=[("--preset", args.preset, saved.preset), ("--recipe", args.recipe, saved.recipe)])


def run_train(args: argparse.Namespace) -> int:
    from difflab.config import RunConfig, load_toml, resolve_config
    from difflab.train import Trainer
    from difflab.train.checkpoint import CONFIG, require_run

    if not args.out:
        raise ConfigError("train: --out RUN_DIR is required")
    out_folder(args.out, "--out")
    overrides = with_spilled_overrides(args)
    resuming = is_resuming(args)
    if resuming:
        run = require_run(args.out, "--out")
        cfg = _resume_config(RunConfig.load(run / CONFIG), args, overrides)
    else:
        if not args.data:
            raise ConfigError("train: --data PATH|fashion-mnist is required")
        toml = load_toml(args.config) if args.config else None
        cfg = resolve_config(preset=args.preset, recipe=_recipe(args), toml=toml, flags=_train_flags(args),
                             overrides=overrides)
        cfg = _conditioned(cfg)
    if cfg.foreign is not None:  # difflab import: the network is another library's
        raise ConfigError(f"--out {args.out} holds an imported {cfg.foreign.label}: difflab trains its own UNet only "
                          "(sample, progress, compare, eval and export work on imported runs)")
    if args.procs > 1 and not args.dry_run and "LOCAL_RANK" not in os.environ:
        from difflab.train.loop import micro_batch

        try:  # refused here, in one line, rather than once by each rank
            micro_batch(cfg.train, args.procs, "procs")
        except ConfigError as e:
            raise ConfigError(f"--procs {args.procs}: {e}") from None
        return run_in_procs(args.procs, args.argv)
    return train_and_report(Trainer, cfg, args, resuming)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; replaced if it is a finished demo)")
    p.add_argument("--minutes", type=nonneg_float, default=5.0, help="training budget (default 5)")
    p.add_argument("--no-progress", action="store_true")
    add_device_option(p)


# A recipe for a few CPU minutes (chosen by looking at sample grids during short runs): the
# 'small' UNet with one block per level, a high learning rate, a short EMA half-life, no dropout.
DEMO_OVERRIDES = [
    "model.num_res_blocks=1", "model.dropout=0", "train.batch_size=64", "train.lr=2e-3",
    "train.warmup_steps=100", "train.ema_halflife_images=5000", "train.sample_every=250",
    "train.checkpoint_every=250", "train.max_steps=100000",
]


def run_demo(args: argparse.Namespace) -> int:
    import shutil

    from difflab.config import resolve_config
    from difflab.devices import resolve_device
    from difflab.io import atomic_write_json
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, SamplerKind, sample
    from difflab.train import Trainer
    from difflab.visualize.images import save_grid

    device = resolve_device(args.device)  # before anything is deleted: a missing GPU is a one-line error
    out = out_folder(args.out, "--out")
    if out.exists():
        if not (out / "demo.json").exists():
            raise ConfigError(f"demo: {out} exists and is not a previous demo; choose another --out")
        shutil.rmtree(out)
    cfg = resolve_config(preset="small", flags={"data.source": "fashion-mnist", "data.image_size": 28,
                                                "train.minutes": args.minutes}, overrides=DEMO_OVERRIDES)
    print(f"difflab demo: training a {cfg.preset} UNet on Fashion-MNIST (28x28) for {args.minutes:g} minutes")
    Trainer(cfg, out, progress=not args.no_progress, device=device).run()
    run = load_run(out, device=device)
    # eta = 1: after minutes of training the deterministic ODE (eta = 0) drifts into saturated speckle,
    # while DDIM's stochastic form corrects the model's errors as it goes (compared on the same run).
    scfg = SamplerConfig(sampler=SamplerKind.DDIM, steps=50, eta=1.0)
    imgs = sample(run.denoiser(), 64, run.image_shape, scfg, seed=0, device=run.device,
                  progress=not args.no_progress)
    grid = save_grid(imgs, out / "demo-grid.png", nrow=8, scale=3)
    atomic_write_json(out / "demo.json", {"grid": str(grid), "step": run.step})
    print(f"run directory:  {out}  (config.json, checkpoints/, log.jsonl)")
    print(f"training grids: {out / 'samples'}")
    print(f"final samples:  {grid}  (64 images, DDIM 50 steps eta 1, EMA weights)")
    print(f"next: difflab sample --run {out} -n 1000 --eta 1 --out {out}/images")
    return 0


COMMANDS: dict[str, Command] = {
    "train": ("train a diffusion model on a folder of images or fashion-mnist", add_train_arguments, run_train),
    "demo": ("train on Fashion-MNIST for a few minutes and sample a grid", add_demo_arguments, run_demo),
}
