"""The figure users care about (issue 7): anime faces at 32 px, the same minutes of training on this
machine, difflab's default recipe against diffusers' unconditional-training recipe; then n samples
from each with the same samplers (difflab's, on the same per-image seeds) and FID/KID side by side.

    difflab     `difflab train --data DATA --image-size 32 --minutes M` (its defaults: `small` preset,
                lr 1e-3, batch 64, bf16 autocast + channels_last where the CPU has native bf16)
    diffusers   the recipe of diffusers' `examples/unconditional_image_generation/train_unconditional.py`
                at resolution 32: its UNet2DModel (channels 128,128,256,256,512,512, 2 layers per block,
                attention in the fifth level), DDPMScheduler(1000, linear), AdamW(lr 1e-4, betas
                (0.95, 0.999), weight decay 1e-6, eps 1e-8), 500 warm-up steps then cosine over 100
                epochs, EMAModel(decay 0.9999, use_ema_warmup, inv_gamma 1, power 3/4), batch 16, random
                horizontal flip, gradient clipping at 1. Run at its fastest on this CPU (bf16 autocast +
                channels_last, which `--mixed_precision bf16` would give), not the script's fp32 default.

Both read the same decoded 32 px uint8 tensor (difflab's folder loader, cached), so data decoding is
not part of the comparison. diffusers' loop is timed on training steps alone (no sampling during the
run); difflab's minutes include its preview grids and checkpoints. Sampling uses difflab's samplers
for both (diffusers' model is an eps predictor on the same linear schedule), in bf16, per-image seeds.

    pip install -e '.[bench,eval]'
    python bench/recipe_anime.py --data ../shared/data/anime-faces --real REAL --minutes 20 -n 1000 \
        --samplers dpmpp-2m-sde-20,ddim-50-eta1 --out runs/recipe

Stages already done (a finished run, a scored sampler folder) are kept when the command is run again.
Last line: ``fid_difflab=X fid_diffusers=Y fid_ratio_diffusers_over_difflab=Z`` (best sampler of each).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import n_params  # noqa: E402

IMAGE_SIZE = 32


# -- diffusers' recipe --------------------------------------------------------------------------
def recipe_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def train_diffusers(data: str, minutes: float, out: Path, seed: int = 0, batch: int = 16, epochs: int = 100) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from difflab.data.dataset import load_dataset, to_float
    from difflab.io import atomic_write_json

    images = load_dataset(data, IMAGE_SIZE, 3).images
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = recipe_unet().to(memory_format=torch.channels_last)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    steps_per_epoch = math.ceil(len(images) / batch)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=steps_per_epoch * epochs)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    model.train()
    step, losses, t_start = 0, [], time.monotonic()
    budget = minutes * 60
    bar = tqdm(total=int(budget), desc="diffusers recipe", unit="s")
    while time.monotonic() - t_start < budget:
        perm = torch.randperm(len(images), generator=g)
        for lo in range(0, len(perm), batch):
            x = to_float(images[perm[lo:lo + batch]])
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x).contiguous(memory_format=torch.channels_last)
            noise = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, 1000, (len(x),), generator=g)
            noisy = sched.add_noise(x, noise, t)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(noisy, t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            ema.step(model.parameters())
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 25 == 0:
                losses.append((step, loss.item()))
                bar.n = int(time.monotonic() - t_start)
                bar.set_postfix(step=step, loss=f"{losses[-1][1]:.4f}")
            if time.monotonic() - t_start >= budget:
                break
    seconds = time.monotonic() - t_start
    bar.close()
    ema.copy_to(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "ema.safetensors"))
    info = {"steps": step, "images_seen": step * batch, "seconds": seconds, "params": n_params(model),
            "batch": batch, "losses": losses, "precision": "bf16 autocast + channels_last"}
    atomic_write_json(out / "train.json", info)
    return info


@dataclass
class DiffusersRun:
    """Enough of :class:`difflab.runs.LoadedRun` for :func:`difflab.visualize.compare.run_comparison`."""

    path: Path
    model: torch.nn.Module
    step: int

    def __post_init__(self) -> None:
        from difflab.schedule import NoiseSchedule

        # DDPMScheduler(1000, "linear") = betas linspace(1e-4, 0.02, 1000), difflab's linear schedule at T = 1000
        self.schedule = NoiseSchedule.from_name("linear", 1000)

    image_shape = (3, IMAGE_SIZE, IMAGE_SIZE)

    def denoiser(self, clip: str = "clip", precision: str = "auto"):
        from difflab.runs import sampling_denoiser

        return sampling_denoiser(EpsOutput(self.model), self.schedule, "eps", clip=clip, precision=precision)


class EpsOutput(torch.nn.Module):
    """diffusers' UNet2DModel returns an output object; difflab's denoiser wants the eps tensor."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def load_diffusers_run(out: Path) -> DiffusersRun:
    from safetensors.torch import load_file

    model = recipe_unet()
    model.load_state_dict(load_file(str(out / "ema.safetensors")))
    info = json.loads((out / "train.json").read_text())
    return DiffusersRun(out, model.eval().to(memory_format=torch.channels_last), info["steps"])


# -- driver -------------------------------------------------------------------------------------
def train_difflab(data: str, minutes: float, out: Path) -> dict:
    if not (out / "latest.json").is_file():
        subprocess.run([sys.executable, "-m", "difflab", "train", "--data", data, "--image-size", str(IMAGE_SIZE),
                        "--minutes", str(minutes), "--out", str(out)], check=True)
    cfg = json.loads((out / "config.json").read_text())
    from difflab.runs import load_run

    run = load_run(out)
    return {"steps": run.step, "images_seen": run.step * cfg["train"]["batch_size"], "params": n_params(run.model),
            "batch": cfg["train"]["batch_size"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/anime-faces")
    p.add_argument("--real", required=True, help="real images (folder or fid-stats .npz) for FID/KID")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--samplers", default="dpmpp-2m-sde-20,ddim-50-eta1", help="for difflab's model")
    p.add_argument("--diffusers-samplers", default="dpmpp-2m-sde-20",
                   help="for diffusers' model (much more compute per image than difflab's: sampling it is the slow part)")
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--train-only", action="store_true", help="stop after both trainings")
    args = p.parse_args()

    from difflab.io import atomic_write_json
    from difflab.runs import load_run
    from difflab.visualize.compare import parse_sampler_specs, run_comparison

    out = Path(args.out)
    infos = {"difflab": train_difflab(args.data, args.minutes, out / "difflab")}
    if not (out / "diffusers" / "train.json").is_file():
        train_diffusers(args.data, args.minutes, out / "diffusers")
    infos["diffusers"] = json.loads((out / "diffusers" / "train.json").read_text())
    if args.train_only:
        return
    runs = {"difflab": load_run(out / "difflab"), "diffusers": load_diffusers_run(out / "diffusers")}
    results = {}
    for name, run in runs.items():
        done = out / name / "compare.json"
        previous = json.loads(done.read_text()) if done.is_file() else None
        if previous is not None and previous["n"] == args.n:
            results[name] = previous
            continue
        specs = parse_sampler_specs(args.samplers if name == "difflab" else args.diffusers_samplers, 1000)
        res = run_comparison(run, specs, n=args.n, out=out / name / "compare", batch_size=args.batch_size,
                             eval_kwargs={"real": args.real, "metrics": ("fid", "kid"), "kid_subset_size": min(1000, args.n)})
        res.pop("_firsts")
        for row in res["rows"]:
            row.pop("eval", None)
        atomic_write_json(done, res)
        results[name] = res

    print(f"\n{args.minutes:g} minutes of training each, {args.n} samples per sampler, FID/KID against {args.real}\n")
    print("| recipe | params | steps | images seen | sampler | images/s | FID | KID (x1000) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    best = {}
    for name in ("difflab", "diffusers"):
        info = infos[name]
        for row in results[name]["rows"]:
            print(f"| {name} | {info['params'] / 1e6:.1f}M | {info['steps']} | {info['images_seen']} | `{row['sampler']}` | "
                  f"{row['images_per_s']:.2f} | {row['fid']:.1f} | {1000 * row['kid_mean']:.1f} ± {1000 * row['kid_std']:.1f} |")
        best[name] = min(r["fid"] for r in results[name]["rows"])
    print(f"\nfid_difflab={best['difflab']:.2f} fid_diffusers={best['diffusers']:.2f} "
          f"fid_ratio_diffusers_over_difflab={best['diffusers'] / best['difflab']:.2f}")


if __name__ == "__main__":
    main()
