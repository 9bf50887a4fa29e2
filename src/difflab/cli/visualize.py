"""The commands that show the process: ``noise``, ``progress``, ``animate``, ``curves`` and ``compare``
(the figures themselves are :mod:`difflab.visualize`'s)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from difflab.cli.common import (
    Command,
    add_condition_options,
    add_run_options,
    add_sampler_options,
    load_run_for,
    out_file,
    out_folder,
    positive_int,
    sampler_config,
)
from difflab.errors import ConfigError, DataError

TRAJECTORY_SAMPLER = "ddpm"  # progress and animate show the full reverse process unless asked otherwise


def _trajectory(args: argparse.Namespace, n: int, frames: int):
    from difflab.samplers import SamplerConfig
    from difflab.visualize.progress import record_trajectory

    run = load_run_for(args, latent=True)
    cfg = sampler_config(args, SamplerConfig.default_for(TRAJECTORY_SAMPLER))
    traj = record_trajectory(run.denoiser(args.clip, args.precision), n, run.image_shape, cfg, frames=frames,
                             seed=args.seed, progress=not args.no_progress)
    if run.codec is not None:  # a latent run: every kept state and x0 estimate shown through the decoder
        def decode(states):
            return run.to_pixels(states.flatten(0, 1), args.precision).unflatten(0, states.shape[:2])
        traj = dataclasses.replace(traj, x=decode(traj.x), x0=decode(traj.x0))
    return run, traj


# -- noise --------------------------------------------------------------------------------------
def add_noise_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.visualize.noising import DEFAULT_TIMESTEPS

    p.add_argument("--image", help="an image file to noise (png, jpg, ...)")
    p.add_argument("--schedule", default="linear",
                   help="noise schedule, or a comma list for one row each: linear, cosine, quadratic, sigmoid, "
                        "sigmoid-alphabar (default linear)")
    p.add_argument("--timesteps", default=",".join(map(str, DEFAULT_TIMESTEPS)),
                   help="comma list of t (0-based) to show (default %(default)s)")
    p.add_argument("-T", "--num-timesteps", type=positive_int, default=1000, help="schedule length T (default 1000)")
    p.add_argument("--size", type=int, default=64, help="centre-crop and resize the image to this (0: keep; default 64)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="3 = RGB (default), 1 = grey")
    p.add_argument("--seed", type=int, default=0, help="seed of the one noise draw used in every picture")
    p.add_argument("--out", default="noise.png", help="the strip (PNG, default noise.png)")
    p.add_argument("--compare-schedules", action="store_true",
                   help="also draw alpha-bar and SNR against t for every schedule (to --schedules-out)")
    p.add_argument("--schedules-out", default="schedules.png", help="the schedule figure (default schedules.png)")


def run_noise(args: argparse.Namespace) -> int:
    from difflab.visualize.figure import save_figure
    from difflab.visualize.noising import load_image, noise_strip_figure, parse_schedules, parse_timesteps, schedules_figure

    if not args.image and not args.compare_schedules:
        raise ConfigError("noise: give --image FILE (a noising strip) and/or --compare-schedules")
    if args.size < 0:
        raise ConfigError(f"--size must be 0 (keep) or a positive integer, got {args.size}")
    schedules = parse_schedules(args.schedule, args.num_timesteps)
    written = []
    if args.image:
        out = out_file(args.out, "--out", (".png",))
        ts = parse_timesteps(args.timesteps, args.num_timesteps)
        x0 = load_image(args.image, args.size or None, args.channels)
        written.append(save_figure(noise_strip_figure(x0, schedules, ts, seed=args.seed), out))
    if args.compare_schedules:
        out = out_file(args.schedules_out, "--schedules-out", (".png",))
        written.append(save_figure(schedules_figure(args.num_timesteps), out))
    print("wrote " + ", ".join(map(str, written)))
    return 0


# -- progress -----------------------------------------------------------------------------------
def add_progress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=positive_int, default=5, help="number of images, one row each (default 5)")
    p.add_argument("--frames", type=positive_int, default=10,
                   help="columns from x_T to x_0, evenly spaced in sampler steps (default 10)")
    add_run_options(p)
    add_sampler_options(p, default=TRAJECTORY_SAMPLER)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-x0", action="store_true", help="leave out the second panel (the predicted x_0 at each step)")
    p.add_argument("--out", help="the figure (PNG; default RUN/progress-<sampler>-<steps>.png)")
    p.add_argument("--npz", help="also save the kept states as arrays (x, x0: frames x n x C x H x W uint8; t)")


def run_progress(args: argparse.Namespace) -> int:
    import numpy as np

    from difflab.data.dataset import to_uint8
    from difflab.io import atomic_path
    from difflab.visualize.figure import save_figure
    from difflab.visualize.progress import progress_figure

    if args.out:
        out_file(args.out, "--out", (".png",))
    if args.npz:
        out_file(args.npz, "--npz", (".npz",))
    run, traj = _trajectory(args, args.n, args.frames)
    out = Path(args.out) if args.out else run.path / f"progress-{traj.sampler.sampler.value}-{traj.num_steps}.png"
    fig = progress_figure(traj, show_x0=not args.no_x0)
    save_figure(fig, out)
    msg = f"wrote {out} ({args.n} images x {traj.frames} steps, {fig.layout.size[0]}x{fig.layout.size[1]} px)"
    if args.npz:
        with atomic_path(args.npz) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, x=to_uint8(traj.x).numpy(), x0=to_uint8(traj.x0).numpy(),
                                    t=np.array([-1.0 if t is None else t for t in traj.t]), step=np.array(traj.step))
        msg += f"; arrays: {args.npz}"
    print(msg)
    return 0


# -- animate ------------------------------------------------------------------------------------
def add_animate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="the GIF (default RUN/denoise.gif)")
    p.add_argument("-n", type=positive_int, default=4, help="samples side by side (default 4)")
    p.add_argument("--frames", type=positive_int, default=40, help="animation frames from x_T to x_0 (default 40)")
    p.add_argument("--duration", type=positive_int, default=100, help="milliseconds per frame (default 100)")
    p.add_argument("--hold", type=positive_int, default=2000, help="milliseconds on the final frame (default 2000)")
    p.add_argument("--scale", type=positive_int, default=3, help="pixel magnification (default 3)")
    p.add_argument("--x0", action="store_true", help="add a second row: the predicted x_0 at each frame")
    add_run_options(p)
    add_sampler_options(p, default=TRAJECTORY_SAMPLER)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_animate(args: argparse.Namespace) -> int:
    from difflab.visualize.animate import animation_frames, save_gif

    if args.out:
        out_file(args.out, "--out", (".gif",))
    run, traj = _trajectory(args, args.n, args.frames)
    out = Path(args.out) if args.out else run.path / "denoise.gif"
    frames = animation_frames(traj, scale=args.scale, show_x0=args.x0)
    save_gif(frames, out, duration_ms=args.duration, hold_ms=args.hold)
    total = (len(frames) - 1) * args.duration + args.hold
    print(f"wrote {out} ({len(frames)} frames, {frames[0].width}x{frames[0].height} px, {total / 1000:.1f} s per loop)")
    return 0


# -- curves -------------------------------------------------------------------------------------
def add_curves_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run directory (reads its log.jsonl)")
    p.add_argument("--smooth", type=float, default=0.8,
                   help="EMA weight in [0, 1) for the smoothed lines, applied to log(loss) (default 0.8; 0 = raw)")
    p.add_argument("--out", help="the figure (PNG; default RUN/curves.png)")


def run_curves(args: argparse.Namespace) -> int:
    from difflab.config import RunConfig
    from difflab.runs import refuse_gan_run
    from difflab.train.checkpoint import CONFIG, require_run
    from difflab.visualize.curves import curves_figure, read_log
    from difflab.visualize.figure import save_figure

    if not 0 <= args.smooth < 1:
        raise ConfigError(f"--smooth must be in [0, 1), got {args.smooth}")
    out = out_file(args.out, "--out", (".png",)) if args.out else None
    run = require_run(args.run)
    refuse_gan_run(run, f"`difflab curves` plots a diffusion run's loss by noise level; a GAN run logs loss_d and "
                        f"loss_g in {run / 'log.jsonl'}, and its preview grids are in {run / 'samples'}")
    cfg = RunConfig.load(run / CONFIG)
    log = read_log(run / "log.jsonl")
    out = out or run / "curves.png"
    save_figure(curves_figure(log, num_timesteps=cfg.schedule.timesteps, smoothing=args.smooth), out)
    print(f"wrote {out} ({len(log)} log records, steps {log.step[0]}-{log.step[-1]}, last loss {log.loss[-1]:.4g})")
    return 0


# -- compare ------------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.visualize.compare import DEFAULT_SAMPLERS

    add_run_options(p)
    add_condition_options(p, sweep=True)
    p.add_argument("-n", type=positive_int, default=1000,
                   help="images per sampler (default 1000; with --class/--label/--prompt: of each condition)")
    p.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                   help="comma list of KIND[-STEPS][-etaETA] (default %(default)s; ddpm alone = every training step)")
    p.add_argument("--real", metavar="DIR|NPZ", help="real images (folder or `difflab fid-stats` file) for FID and KID")
    p.add_argument("--metrics", help="comma list of fid, kid, detect, accuracy (default: fid,kid with --real, "
                                     "plus accuracy for --class/--label on a labelled run)")
    p.add_argument("--detectors", default="lbp,animeface", help="for detect: comma list of lbp, animeface")
    p.add_argument("--cascade", metavar="FILE", help="lbpcascade_animeface.xml for the lbp detector (default: search)")
    p.add_argument("--fid-weights", metavar="FILE", help="the FID network file (see `difflab eval --help`)")
    p.add_argument("--kid-subset-size", type=positive_int, default=1000, help="KID subset size (default 1000)")
    p.add_argument("--out", help="output folder (default RUN/compare): images per sampler, compare.md/.json/.png")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--no-progress", action="store_true")


def run_compare(args: argparse.Namespace) -> int:
    from difflab.captions import requests
    from difflab.io import atomic_write_bytes, atomic_write_json
    from difflab.visualize.compare import (
        comparison_figure,
        guidance_figure,
        markdown_table,
        parse_sampler_specs,
        run_comparison,
        samples_figure,
    )
    from difflab.visualize.figure import save_figure

    conditioned = bool(args.classes or args.label)
    default = ",".join(["fid,kid"] * bool(args.real) + ["accuracy"] * conditioned)
    metrics = args.metrics if args.metrics is not None else default
    metric_list = [m.strip() for m in metrics.split(",") if m.strip()]
    eval_kwargs = None
    if metric_list:
        from difflab.metrics.evaluate import EvalConfig

        eval_kwargs = {"real": args.real, "metrics": ",".join(metric_list), "detectors": args.detectors,
                       "cascade": args.cascade, "fid_weights": args.fid_weights,
                       "kid_subset_size": args.kid_subset_size, "run": args.run if "accuracy" in metric_list else None}
        EvalConfig(fake=".", **eval_kwargs)  # checks the metric names and that fid/kid have --real
        if args.real and not Path(args.real).expanduser().exists():
            raise DataError(f"--real {args.real} does not exist")
    out = out_folder(args.out, "--out") if args.out else None
    run = load_run_for(args, latent=True)
    specs = parse_sampler_specs(args.samplers, run.schedule.num_timesteps)
    reqs = requests(run.config.cond, args.classes, args.label, args.prompt)
    out = out or run.path / "compare"
    result = run_comparison(run, specs, n=args.n, out=out, seed=args.seed, batch_size=args.batch_size,
                            eval_kwargs=eval_kwargs, clip=args.clip, precision=args.precision, progress=not args.no_progress,
                            guidance=args.guidance, reqs=reqs, guidance_interval=args.guidance_interval)
    firsts = result.pop("_firsts")
    table = markdown_table(result)
    atomic_write_json(out / "compare.json", result)
    atomic_write_bytes(out / "compare.md", table.encode())
    save_figure(comparison_figure(result), out / "compare.png")
    save_figure(samples_figure(result, firsts), out / "samples.png")
    extra = ""
    if len(args.guidance) > 1:
        save_figure(guidance_figure(result), out / "guidance.png")
        extra = ", guidance.png"
    print(table)
    print(f"wrote {out}/compare.md, compare.json, compare.png (speed{' and quality' if eval_kwargs else ''}), "
          f"samples.png{extra}; images in {out}/<sampler>/")
    return 0


COMMANDS: dict[str, Command] = {
    "noise": ("the forward process: one image noised at chosen timesteps; schedules compared",
              add_noise_arguments, run_noise),
    "progress": ("the reverse process as a grid: one row per sample, one column per step from x_T to x_0",
                 add_progress_arguments, run_progress),
    "animate": ("the reverse process as an animated GIF", add_animate_arguments, run_animate),
    "curves": ("training loss against step, overall and per timestep quartile, from log.jsonl",
               add_curves_arguments, run_curves),
    "compare": ("DDPM vs DDIM (any samplers) on the same seeds: time, images/s, FID, KID, detection rate",
                add_compare_arguments, run_compare),
}
