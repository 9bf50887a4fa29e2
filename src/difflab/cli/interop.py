"""``difflab import`` and ``difflab export``: models from diffusers and denoising-diffusion-pytorch in, difflab
runs out to diffusers (the work is :mod:`difflab.interop`'s).

    difflab import --diffusers PATH [--scheduler FILE] [--image-size N] --out RUN
    difflab import --ddpm-pytorch model-N.pt --dim 64 --image-size 32 [--dim-mults 1,2,4,8 ...] [--config FILE] --out RUN
    difflab export --run RUN --diffusers OUT
"""
from __future__ import annotations

import argparse

from difflab.cli.common import Command, choices, out_folder, positive_int
from difflab.errors import ConfigError

# denoising-diffusion-pytorch's settings a flag states (flag -> the library's argument name)
_DDPM_PYTORCH_FLAGS = ("dim", "dim_mults", "channels", "image_size", "timesteps", "beta_schedule", "objective")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, e.g. 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.interop.ddpm_pytorch import BETA_SCHEDULES, LIBRARY_VERSION, OBJECTIVES
    from difflab.runs import Weights

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", metavar="PATH",
                        help="a diffusers save_pretrained folder: a pipeline (unet/ and scheduler/) or a UNet2DModel folder "
                             "(config.json + weights, with scheduler_config.json beside it or --scheduler)")
    source.add_argument("--ddpm-pytorch", metavar="FILE",
                        help="a denoising-diffusion-pytorch Trainer checkpoint (model-N.pt; read with weights_only=True)")
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--scheduler", metavar="FILE", help="diffusers: the scheduler_config.json of a UNet2DModel folder")
    p.add_argument("--image-size", type=positive_int,
                   help="diffusers: replaces the UNet's sample_size; ddpm-pytorch: the image size it was trained at (required)")
    g = p.add_argument_group(f"denoising-diffusion-pytorch settings (the library's argument names; unstated ones take "
                             f"version {LIBRARY_VERSION}'s defaults)")
    g.add_argument("--config", metavar="FILE",
                   help="a TOML (.toml) or JSON file of Unet/GaussianDiffusion arguments, e.g. dim, dim_mults, attn_heads, "
                        "full_attn, schedule_fn_kwargs, sampling_timesteps; flags override it")
    g.add_argument("--dim", type=positive_int, help="the Unet's dim (required: the library has no default)")
    g.add_argument("--dim-mults", type=_int_list, metavar="M,M,...", help="default 1,2,4,8")
    g.add_argument("--channels", type=int, choices=[1, 3], help="default 3")
    g.add_argument("--timesteps", type=positive_int, help="default 1000")
    g.add_argument("--beta-schedule", choices=list(BETA_SCHEDULES), help=f"default sigmoid (version {LIBRARY_VERSION})")
    g.add_argument("--objective", choices=list(OBJECTIVES), help=f"default pred_v (version {LIBRARY_VERSION})")
    g.add_argument("--weights", default=Weights.EMA.value, choices=choices(Weights),
                   help="the checkpoint's EMA weights (default) or the online model's")


def run_import(args: argparse.Namespace) -> int:
    from difflab.interop.common import check_out, write_imported_run
    from difflab.interop.diffusers_import import describe, read_diffusers

    check_out(out_folder(args.out, "--out"))
    if args.diffusers:
        stray = [f"--{k.replace('_', '-')}" for k in (*_DDPM_PYTORCH_FLAGS, "config")
                 if k != "image_size" and getattr(args, k) is not None]
        if stray:
            raise ConfigError(f"import: {stray[0]} is a --ddpm-pytorch setting; a diffusers folder states its own")
        model = read_diffusers(args.diffusers, scheduler=args.scheduler, image_size=args.image_size)
    else:
        from difflab.interop.ddpm_pytorch import read_ddpm_pytorch, read_settings_file, settings_from

        if args.scheduler:
            raise ConfigError("import: --scheduler is for --diffusers; a denoising-diffusion-pytorch model states its "
                              "schedule with --beta-schedule and --timesteps")
        values = read_settings_file(args.config) if args.config else {}
        values.update({k: getattr(args, k) for k in _DDPM_PYTORCH_FLAGS if getattr(args, k) is not None})
        settings = settings_from(values, f"--config {args.config}" if args.config else "import")
        model = read_ddpm_pytorch(args.ddpm_pytorch, settings, args.weights)
    cfg = write_imported_run(args.out, model)
    for note in model.notes:
        print(f"note: {note}")
    print(f"imported {describe(model)} into {args.out}")
    print(f"next: difflab sample --run {args.out} -n 16 --grid grid.png"
          + (" --steps 50" if cfg.sampler.steps is None else ""))
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.runs import Weights

    p.add_argument("--run", required=True, help="a difflab run directory")
    p.add_argument("--diffusers", required=True, metavar="OUT",
                   help="a new folder for the diffusers pipeline (OUT/unet, OUT/scheduler, OUT/model_index.json)")
    p.add_argument("--weights", default=Weights.EMA.value, choices=choices(Weights), help="EMA (default) or raw weights")


def run_export(args: argparse.Namespace) -> int:
    from difflab.interop.diffusers_export import export_diffusers

    out = export_diffusers(args.run, args.diffusers, args.weights)
    print(f"wrote a diffusers pipeline to {out}: UNet2DModel.from_pretrained('{out}/unet'), "
          f"DDPMPipeline.from_pretrained('{out}')")
    return 0


COMMANDS: dict[str, Command] = {
    "import": ("import a diffusers folder or a denoising-diffusion-pytorch checkpoint as a difflab run",
               add_import_arguments, run_import),
    "export": ("export a run to diffusers (UNet2DModel + scheduler folder)", add_export_arguments, run_export),
}
