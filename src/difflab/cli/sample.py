"""``difflab sample``: 1.jpg ... N.jpg from a trained run, and the record of how they were made.

The images folder holds the images alone (a homework submission folder must); the record is written
beside it (:mod:`difflab.records`), one per shard (``--start``). Shards may write one folder at the same
time, overlapping or not; a folder holding images of another sampling is refused before any work. How
(atomic image files, records claimed under a lock on the folder) is :mod:`difflab.sample_sets`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflab.cli.common import (
    RUN_SAMPLER,
    Command,
    add_condition_options,
    add_format_options,
    add_run_options,
    add_sampler_options,
    check_outputs,
    format_fields,
    load_run_for,
    nonneg_int,
    positive_int,
    sampler_config,
    sampler_name,
)
from difflab.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command runs
    from difflab.captions import Request
    from difflab.denoiser import Denoiser
    from difflab.runs import LoadedRun
    from difflab.samplers import SamplerConfig


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p, compile=True)
    add_sampler_options(p, default=RUN_SAMPLER)
    add_condition_options(p)
    p.add_argument("-n", type=positive_int, default=16, help="number of images (of each class/label/prompt; default 16)")
    p.add_argument("--start", type=nonneg_int, default=0,
                   help="first image index: writes START+1 ... START+N, the same images a single run of START+N writes "
                        "(split one sample set across processes or sessions)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", help="folder for 1.jpg ... N.jpg, and nothing else (default: RUN/samples/<sampler>-<steps>...); "
                                 "the record of the run goes beside it, <folder>.sampling.json")
    add_format_options(p)
    p.add_argument("--grid", help="also save a grid of the first 64 images to this file (.png or .jpg)")
    p.add_argument("--upscale-run", metavar="SR_RUN",
                   help="cascade: upscale every image with this super-resolution run (trained with --task upscale --from "
                        "<this run's size>), writing the upscaled images; it samples with its own [sampler] table")
    p.add_argument("--upscale-steps", type=positive_int, help="sampling steps of the --upscale-run stage")
    p.add_argument("--no-progress", action="store_true")


@dataclass(frozen=True)
class SamplePlan:
    """What ``difflab sample`` generates, resolved from its flags against a loaded run: the sampler
    config, the conditions asked for (``reqs``; none = unconditional), the per-image condition rows
    (the keywords of :func:`difflab.samplers.sample_batches`) and the number of images. ``difflab
    serve`` builds the same plan from the command line it shows, so the page and the CLI agree."""

    args: argparse.Namespace
    cfg: SamplerConfig
    reqs: list[Request]
    cond: dict[str, Any]
    total: int

    def denoiser(self, run: LoadedRun) -> Denoiser:
        a = self.args
        return run.denoiser(a.clip, a.precision, a.compile, guidance=a.guidance, guidance_interval=a.guidance_interval)


def plan_sample(args: argparse.Namespace, run: LoadedRun) -> SamplePlan:
    """The :class:`SamplePlan` of ``sample``'s flags ``args`` for ``run``; every bad option is a
    one-line error here, before any work."""
    from difflab.captions import condition_rows, requests
    from difflab.samplers import make_grid

    if run.config.upscale.active:
        raise ConfigError(f"--run {args.run} is a super-resolution run (from {run.config.upscale.from_size} px): use "
                          "difflab upscale --run SR --images ..., or difflab sample --run BASE --upscale-run SR")
    cfg = sampler_config(args, run.config.sampler)
    make_grid(run.schedule, cfg)  # a bad --steps fails here, before any work
    reqs = requests(run.config.cond, args.classes, args.label, args.prompt)
    if args.start and reqs:
        raise ConfigError("--start splits an unconditional sample set; with --class/--label/--prompt sample each on its own")
    cond: dict[str, Any] = dict(condition_rows(run.config.cond, reqs, args.n))  # keywords of sample_batches
    return SamplePlan(args, cfg, reqs, cond, args.n * max(len(reqs), 1))


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from difflab.config import to_dict
    from difflab.edit.upscale import upscale_batches
    from difflab.records import conditions
    from difflab.sample_sets import abandon, claim, finish
    from difflab.samplers import sample_batches
    from difflab.visualize.images import ImageFormat, save_grid, save_numbered

    grid_file = check_outputs(args)
    run = load_run_for(args, latent=True)
    plan = plan_sample(args, run)
    cfg, reqs, cond, total = plan.cfg, plan.reqs, plan.cond, plan.total
    stage = _upscale_stage(args, run) if args.upscale_run else None
    T = run.schedule.num_timesteps
    out = Path(args.out).expanduser() if args.out else run.path / "samples" / sampler_name(cfg, T)
    kept: list[torch.Tensor] = []
    per_row = min(args.n, 8)
    by_row = len(reqs) > 1  # several conditions: one grid row each; one (or none): the first 64 images
    t0 = time.monotonic()
    denoiser = plan.denoiser(run)
    fmt = ImageFormat(args.format).value
    # claim the images before writing any: refuses a folder holding another sampling's images (one line)
    record_file, record, notes = claim(out, {
        "run": str(run.path.resolve()), "step": run.step, "n": total, "start": args.start, "seed": args.seed,
        "weights": args.weights, "clip": args.clip, "precision": args.precision, "compile": args.compile,
        "sampler": to_dict(cfg), "grid_kind": cfg.grid_kind.value, "nfe_per_image": cfg.nfe(T), "seconds": None,
        "guidance": args.guidance, "guidance_interval": args.guidance_interval, **format_fields(args),
        "conditions": conditions(reqs, args.n, run.config.cond.schema),
        "upscale": None if stage is None else {"run": str(stage[0].path.resolve()), "step": stage[0].step,
                                               "sampler": to_dict(stage[2]), "from_size": stage[0].config.upscale.from_size,
                                               "size": stage[0].image_shape[1]},
    })
    for note in notes:
        print(f"note: {note}")
    written = 0
    try:
        for idx, imgs in sample_batches(denoiser, total, run.image_shape, cfg, seed=args.seed, batch_size=args.batch_size,
                                        start=args.start, device=run.device, progress=not args.no_progress, **cond):
            imgs = run.to_pixels(imgs, args.precision)  # a latent run's latents decoded to images
            if stage is not None:  # the cascade's second stage, on this batch (image k keeps its index and seed)
                sr_run, sr_denoiser, sr_cfg = stage
                imgs = torch.cat([b for _, b in upscale_batches(
                    sr_denoiser, imgs, sr_run.config.upscale, sr_run.image_shape[1], sr_cfg, seed=args.seed,
                    start=idx.start, batch_size=args.batch_size, device=sr_run.device, progress=False)])
            save_numbered(imgs, out, idx.start, fmt, args.jpeg_quality)
            written += len(imgs)
            # the grid: the first 64 images, or the first `per_row` images of each request, one row each
            kept += [img for k, img in zip(idx, imgs) if ((k - args.start) % args.n < per_row if by_row else len(kept) < 64)]
    except BaseException:
        if not written:
            abandon(record_file, record)
        raise
    seconds = time.monotonic() - t0
    finish(record_file, {**record, "seconds": seconds})
    if grid_file is not None:
        save_grid(torch.stack(kept), grid_file, nrow=per_row if by_row else None)
    print(f"wrote {total} images to {out} in {seconds:.1f} s ({total / seconds:.1f} images/s); record: {record_file}"
          + (f"; grid: {grid_file}" + (" (one row per condition)" if by_row else "") if grid_file else ""))
    return 0


def _upscale_stage(args: argparse.Namespace, run: Any) -> tuple[Any, Any, Any]:
    """The --upscale-run stage: (run, denoiser, sampler config), checked against the base run."""
    import dataclasses


    sr = load_run_for(args, args.upscale_run)
    up = sr.config.upscale
    if not up.active:
        raise ConfigError(f"--upscale-run {args.upscale_run} is not a super-resolution run "
                          "(train it with --task upscale --from SIZE)")
    if (up.from_size, sr.image_shape[0]) != (run.pixel_shape[1], run.pixel_shape[0]):
        raise ConfigError(f"--upscale-run {args.upscale_run} upscales {sr.image_shape[0]}-channel {up.from_size} px images, but "
                          f"--run {args.run} makes {run.pixel_shape[0]}-channel {run.pixel_shape[1]} px images")
    cfg = sr.config.sampler if args.upscale_steps is None else dataclasses.replace(sr.config.sampler, steps=args.upscale_steps)
    return sr, sr.denoiser(args.clip, args.precision), cfg


COMMANDS: dict[str, Command] = {
    "sample": ("generate images from a trained run (1.jpg ... N.jpg)", add_sample_arguments, run_sample),
}
