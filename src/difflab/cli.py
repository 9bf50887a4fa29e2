"""The ``difflab`` command line: train, sample, demo (and eval, fid-stats from difflab.metrics).

Every user mistake (bad flag, missing path, incompatible options, damaged file) is reported as one
line, ``difflab: error: ...``, with exit status 2; tracebacks are for bugs only.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

from difflab.errors import ConfigError, DifflabError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump -> our one line
        command = self.prog.split()[-1]  # the subcommand; the top-level parser is 'difflab' itself
        raise ConfigError(message if command == "difflab" else f"{command}: {message}")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


# -- train ------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.config import preset_names

    p.add_argument("--data", help="a folder of images (searched recursively) or 'fashion-mnist'")
    p.add_argument("--image-size", type=_positive_int, help="training resolution in pixels (default 32)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 (grey) or 3 (RGB); default: the data's own")
    p.add_argument("--out", help="run directory to create (or continue, with --resume)")
    p.add_argument("--config", help="a TOML file with [model], [schedule], [loss], [data], [train], [sampler] tables")
    p.add_argument("--preset", choices=preset_names(), help="network size preset (default: small)")
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
    p.add_argument("--minutes", type=_nonneg_float, help="stop after this many minutes of training (0 = no limit)")
    p.add_argument("--batch-size", type=_positive_int, help="images per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="training seed")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.lr=1e-4 schedule.kind=cosine model.dropout=0")


def _train_flags(args: argparse.Namespace) -> dict:
    return {
        "data.source": args.data, "data.image_size": args.image_size, "data.channels": args.channels,
        "train.max_steps": args.max_steps, "train.minutes": args.minutes, "train.batch_size": args.batch_size,
        "train.lr": args.lr, "train.seed": args.seed,
    }


def run_train(args: argparse.Namespace) -> int:
    from difflab.config import RunConfig, apply_overrides, load_toml, resolve_config
    from difflab.train import Trainer
    from difflab.train.checkpoint import CONFIG, require_run

    if not args.out:
        raise ConfigError("train: --out RUN_DIR is required")
    if args.resume:
        run = require_run(args.out)
        cfg = RunConfig.load(run / CONFIG)
        changes = {k: v for k, v in _train_flags(args).items() if v is not None and k.startswith("train.")}
        others = [k for k, v in _train_flags(args).items() if v is not None and not k.startswith("train.")]
        bad = others + [o for o in args.overrides if not o.startswith("train.")]
        if bad or args.config or args.preset:
            raise ConfigError(f"--resume continues the saved config; only training options may change, not {bad or '--config/--preset'}")
        cfg = apply_overrides(apply_overrides(cfg, {k: v for k, v in changes.items()}), args.overrides)
    else:
        if not args.data:
            raise ConfigError("train: --data PATH|fashion-mnist is required")
        toml = load_toml(args.config) if args.config else None
        cfg = resolve_config(preset=args.preset, toml=toml, flags=_train_flags(args), overrides=args.overrides)
    if args.dry_run:
        print(cfg.to_json(), end="")
        return 0
    trainer = Trainer(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if args.resume:
        # keep the changed training options with the run, so the next resume sees them
        from difflab.io import atomic_write_bytes
        atomic_write_bytes(Path(args.out) / CONFIG, cfg.to_json().encode())
    result = trainer.run()
    print(f"trained to step {result['step']} ({result['stopped_by']}) in {result['seconds']:.0f} s; run: {result['run_dir']}")
    return 0


# -- sample -----------------------------------------------------------------------------------
def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.samplers import GridKind, SamplerKind, Spacing

    p.add_argument("--run", required=True, help="a run directory made by `difflab train`")
    p.add_argument("-n", type=_positive_int, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", default="ddim", choices=[k.value for k in SamplerKind], help="default ddim")
    p.add_argument("--steps", type=_positive_int,
                   help="sampling steps (default: 50; ddpm: all training steps); heun costs 2N-1 network calls, others N")
    p.add_argument("--grid-kind", choices=[k.value for k in GridKind],
                   help="step grid (default: uniform for ddpm/ddim, karras for euler/heun, log-snr for dpmpp-*)")
    p.add_argument("--trailing", action="store_true",
                   help="leave out the network call at t = 0: the grid of STEPS + 1 points minus its last (Lin et al. 2024)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 = DDPM (default 0)")
    p.add_argument("--churn", type=_nonneg_float, default=0.0, help="euler/heun: Karras et al.'s S_churn noise (default 0)")
    p.add_argument("--spacing", default="uniform", choices=[s.value for s in Spacing], help="older name for --grid-kind uniform|quadratic")
    p.add_argument("--variance", default="fixed-small", choices=["fixed-small", "fixed-large"], help="DDPM variance")
    p.add_argument("--clip", default="clip", choices=["none", "clip", "dynamic"],
                   help="x0_hat clipping to the data range [-1, 1] at each step (default clip; dynamic = Imagen thresholding)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    add_precision_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (needs a C++ compiler; pays for large sample sets once compiled)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed (seed, k): same seed, same images")
    p.add_argument("--start", type=_nonneg_int, default=0,
                   help="first image index: writes START+1 ... START+N, the same images a single run of START+N writes "
                        "(split one sample set across processes or sessions)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--out", help="folder for 1.jpg ... N.jpg (default: RUN/samples/<sampler>-<steps>[-<grid-kind>])")
    p.add_argument("--format", default="jpg", choices=["jpg", "png"], help="image format (default jpg)")
    p.add_argument("--grid", help="also save a grid of the first 64 images to this file")
    p.add_argument("--no-progress", action="store_true")


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="network precision: auto = bf16 autocast where the CPU/GPU does bf16 natively (default)")


def run_sample(args: argparse.Namespace) -> int:
    from difflab.config import to_dict
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample_batches
    from difflab.viz import save_grid, save_numbered

    steps = args.steps if args.steps is not None else (None if args.sampler == "ddpm" else 50)
    cfg = SamplerConfig(sampler=args.sampler, steps=steps, eta=args.eta, spacing=args.spacing, variance=args.variance,
                        grid=args.grid_kind, churn=args.churn, trailing=args.trailing)
    run = load_run(args.run, weights=args.weights)
    name = (f"{args.sampler}-{steps or run.schedule.num_timesteps}" + (f"-{args.grid_kind}" if args.grid_kind else "")
            + ("-trailing" if args.trailing else ""))
    out = Path(args.out) if args.out else run.path / "samples" / name
    first = []
    t0 = time.monotonic()
    for idx, imgs in sample_batches(run.denoiser(args.clip, args.precision, args.compile), args.n, run.image_shape, cfg, seed=args.seed,
                                    batch_size=args.batch_size, start=args.start, progress=not args.no_progress):
        save_numbered(imgs, out, idx.start, args.format)
        if len(first) * args.batch_size < 64:
            first.append(imgs)
    seconds = time.monotonic() - t0
    meta = {"run": str(run.path), "step": run.step, "n": args.n, "start": args.start, "seed": args.seed, "weights": args.weights,
            "clip": args.clip, "precision": args.precision, "compile": args.compile, "sampler": to_dict(cfg), "grid_kind": cfg.grid_kind.value,
            "nfe_per_image": cfg.nfe(run.schedule.num_timesteps), "seconds": seconds}
    from difflab.io import atomic_write_json
    # a shard (--start > 0) keeps its own record beside the first one's
    atomic_write_json(out / ("sampling.json" if args.start == 0 else f"sampling-from-{args.start + 1}.json"), meta)
    if args.grid:
        import torch
        save_grid(torch.cat(first)[:64], args.grid)
    print(f"wrote {args.n} images to {out} in {seconds:.1f} s ({args.n / seconds:.1f} images/s)"
          + (f"; grid: {args.grid}" if args.grid else ""))
    return 0


# -- demo -------------------------------------------------------------------------------------
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; replaced if it is a finished demo)")
    p.add_argument("--minutes", type=_nonneg_float, default=5.0, help="training budget (default 5)")
    p.add_argument("--no-progress", action="store_true")


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
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample
    from difflab.train import Trainer
    from difflab.viz import save_grid

    out = Path(args.out)
    if out.exists():
        if not (out / "demo.json").exists():
            raise ConfigError(f"demo: {out} exists and is not a previous demo; choose another --out")
        shutil.rmtree(out)
    cfg = resolve_config(preset="small", flags={"data.source": "fashion-mnist", "data.image_size": 28,
                                                "train.minutes": args.minutes}, overrides=DEMO_OVERRIDES)
    print(f"difflab demo: training a {cfg.preset} UNet on Fashion-MNIST (28x28) for {args.minutes:g} minutes")
    Trainer(cfg, out, progress=not args.no_progress).run()
    run = load_run(out)
    # eta = 1: after minutes of training the deterministic ODE (eta = 0) drifts into saturated speckle,
    # while DDIM's stochastic form corrects the model's errors as it goes (compared on the same run).
    scfg = SamplerConfig(sampler="ddim", steps=50, eta=1.0)
    imgs = sample(run.denoiser(), 64, run.image_shape, scfg, seed=0, progress=not args.no_progress)
    grid = save_grid(imgs, out / "demo-grid.png", nrow=8, scale=3)
    from difflab.io import atomic_write_json
    atomic_write_json(out / "demo.json", {"grid": str(grid), "step": run.step})
    print(f"run directory:  {out}  (config.json, checkpoints/, log.jsonl)")
    print(f"training grids: {out / 'samples'}")
    print(f"final samples:  {grid}  (64 images, DDIM 50 steps eta 1, EMA weights)")
    print(f"next: difflab sample --run {out} -n 1000 --eta 1 --out {out}/images")
    return 0


# -- wiring -----------------------------------------------------------------------------------
def _commands() -> dict[str, tuple[str, Callable, Callable]]:
    cmds: dict[str, tuple[str, Callable, Callable]] = {
        "train": ("train a diffusion model on a folder of images or fashion-mnist", add_train_arguments, run_train),
        "sample": ("generate images from a trained run (1.jpg ... N.jpg)", add_sample_arguments, run_sample),
        "demo": ("train on Fashion-MNIST for a few minutes and sample a grid", add_demo_arguments, run_demo),
    }
    from difflab.metrics import cli as metrics_cli  # eval, fid-stats

    cmds.update(metrics_cli.COMMANDS)
    from difflab.visualize import cli as visualize_cli  # noise, progress, animate, curves, compare

    cmds.update(visualize_cli.COMMANDS)
    return cmds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="difflab", description="Train, sample, evaluate and visualise image diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add, _) in _commands().items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda msg, *a, **k: print(f"difflab: warning: {msg}", file=sys.stderr)
            return _commands()[args.command][2](args)
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
