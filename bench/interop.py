"""Bring your own model (issue 20): a diffusers model imported with `difflab import`, sampled by difflab
against diffusers' own DDIM pipeline on the same weights and seeds.

1. A diffusers ``UNet2DModel`` (seeded initial weights; ``--arch small``: 32x32 RGB, channels 32/64/64,
   2 blocks per level, attention at 16x16 and in the middle, 1.6 M parameters; ``--arch matched``: the
   64/128/256 model of bench/train_speed.py) and a ``DDIMScheduler`` (DDPM's linear schedule, epsilon) are
   saved with ``save_pretrained`` and imported with ``difflab import --diffusers``; the run's network is
   diffusers' own module, so both sides run the same weights.
2. Agreement: DDIM with eta 0 from the same initial noise (the pipeline's generator draws it) on the same
   timestep grid (the scheduler's own 50 ``leading`` timesteps, given to difflab as a Grid), both in fp32:
   the max abs difference of the final images (the pipeline's [0, 1] output) and of the raw final states
   (before the pipeline's clamp), without x0 clipping (``clip_sample=False`` / ``--clip none``) and with it
   (``clip_sample=True`` with ``use_clipped_model_output=True``, which is difflab's ``--clip clip``).
3. Speed, interleaved A B C D, A B C D, ... in one process, each call generating ``--batch`` images:

       diffusers_ddim50      DDIMPipeline(batch_size=B, num_inference_steps=50, eta=0), fp32 (its CPU default)
       difflab_dpmpp20       `difflab sample --sampler dpmpp-2m --steps 20` on the imported run: precision
                             auto (bf16 autocast + channels_last where the CPU has native bf16), x0 clipping
       difflab_dpmpp20_fp32  the same in fp32
       difflab_ddim50_fp32   difflab's DDIM, 50 steps, fp32: the pipeline's work, difflab's driver

    pip install -e '.[interop]'
    python bench/interop.py [--arch small] [--batch 8] [--rounds 3] [--threads 2]

Last line: ``interop_ratio_dpmpp20_vs_diffusers_ddim50=X ddim_max_abs_diff=Y`` (images/s of difflab's
DPM-Solver++(2M) at 20 steps over diffusers' DDIM pipeline at 50 steps; the largest DDIM difference).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import diffusers_unet, interleave  # noqa: E402

STEPS_DDIM, STEPS_DPMPP = 50, 20


def make_unet(arch: str):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if arch == "matched":
        return diffusers_unet()
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, norm_num_groups=8)


def import_run(unet, root: Path):
    """save_pretrained -> difflab import -> load_run: the imported run (network = diffusers' module)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from difflab.cli import main
    from difflab.runs import load_run

    DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(root / "pipe")
    assert main(["import", "--diffusers", str(root / "pipe"), "--out", str(root / "run")]) == 0
    return load_run(root / "run")


def ddim_agreement(run, unet, batch: int, seed: int, clip: bool) -> tuple[float, float, float]:
    """(max |difference| of the [0, 1] images, of the raw final states, max |raw state|) for DDIM eta 0."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from difflab.samplers import Grid, SamplerConfig, run_sampler

    scheduler = DDIMScheduler(clip_sample=clip)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    shape = (batch, 3, unet.config.sample_size, unet.config.sample_size)
    with torch.no_grad():
        images = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS_DDIM,
                      eta=0.0, use_clipped_model_output=clip, output_type="np").images
        theirs = torch.from_numpy(images).permute(0, 3, 1, 2)
        # the pipeline's own loop once more, to keep its raw final state (the pipeline clamps it to [0, 1])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        noise = x.clone()
        scheduler.set_timesteps(STEPS_DDIM)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
        ts = scheduler.timesteps.to(torch.float64)
        grid = Grid(t=ts, sigma=torch.cat([run.schedule.sigmas[scheduler.timesteps], torch.zeros(1, dtype=torch.float64)]))
        denoiser = run.denoiser(clip="clip" if clip else "none", precision="fp32")
        ours_raw = run_sampler(denoiser, noise, grid, SamplerConfig(sampler="ddim", eta=0.0))
    ours = (ours_raw / 2 + 0.5).clamp(0, 1)
    return float((ours - theirs).abs().max()), float((ours_raw - x).abs().max()), float(x.abs().max())


def speed_variants(run, unet, batch: int) -> dict[str, Callable[[], None]]:
    from diffusers import DDIMPipeline, DDIMScheduler

    from difflab.samplers import SamplerConfig, sample

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    shape = run.image_shape
    seeds = iter(range(10**9))

    def diffusers_ddim() -> None:
        with torch.no_grad():
            pipe(batch_size=batch, generator=torch.Generator().manual_seed(next(seeds)), num_inference_steps=STEPS_DDIM,
                 eta=0.0, output_type="np")

    def difflab(precision: str, sampler: str, steps: int) -> Callable[[], None]:
        denoiser = run.denoiser(precision=precision)
        cfg = SamplerConfig.default_for(sampler, steps=steps)

        def call() -> None:
            sample(denoiser, batch, shape, cfg, seed=next(seeds), batch_size=batch, progress=False)

        return call

    return {"diffusers_ddim50": diffusers_ddim,
            "difflab_dpmpp20": difflab("auto", "dpmpp-2m", STEPS_DPMPP),
            "difflab_dpmpp20_fp32": difflab("fp32", "dpmpp-2m", STEPS_DPMPP),
            "difflab_ddim50_fp32": difflab("fp32", "ddim", STEPS_DDIM)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("small", "matched"), default="small")
    p.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet = make_unet(args.arch).eval().requires_grad_(False)
    params = sum(q.numel() for q in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        run = import_run(unet, Path(tmp))
        print(f"imported diffusers UNet2DModel ({args.arch}, {params / 1e6:.2f} M parameters) as {run.path.name}; "
              f"{args.threads} threads, batch {args.batch}, {args.rounds} rounds")
        print("\nDDIM agreement (eta 0, fp32, same initial noise, the scheduler's 50 timesteps):\n")
        print("| x0 clipping | max abs diff, [0, 1] images | max abs diff, raw final state | max abs raw state | relative |")
        print("|---|---:|---:|---:|---:|")
        worst = 0.0
        for clip in (False, True):
            img, raw, scale = ddim_agreement(run, unet, args.batch, seed=1, clip=clip)
            worst = max(worst, img, raw)
            print(f"| {'clip (use_clipped_model_output)' if clip else 'none'} | {img:.2e} | {raw:.2e} | {scale:.2f} | "
                  f"{raw / scale:.1e} |")
        print()
        times = interleave(speed_variants(run, unet, args.batch), rounds=args.rounds, per_round=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: args.batch / v for k, v in med.items()}
    base = rate["diffusers_ddim50"]
    print("\n| variant | network evals / image | s per batch (median) | images/s | vs diffusers DDIM-50 |")
    print("|---|---:|---:|---:|---:|")
    nfe = {"diffusers_ddim50": STEPS_DDIM, "difflab_dpmpp20": STEPS_DPMPP, "difflab_dpmpp20_fp32": STEPS_DPMPP,
           "difflab_ddim50_fp32": STEPS_DDIM}
    for name in times:
        print(f"| {name} | {nfe[name]} | {med[name]:.2f} | {rate[name]:.2f} | {rate[name] / base:.2f}x |")
    print(f"interop_ratio_dpmpp20_vs_diffusers_ddim50={rate['difflab_dpmpp20'] / base:.2f} ddim_max_abs_diff={worst:.2e}")


if __name__ == "__main__":
    main()
