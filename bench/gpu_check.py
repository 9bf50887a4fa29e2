"""One short script for a machine with a GPU (issue 17): the CUDA tests, then difflab's training step at
the matched architecture in fp32 / bf16 / fp16 (and bf16 + torch.compile) against diffusers'
UNet2DModel in the same run, sampling rate, FID-feature rate and peak GPU memory. Under 8 minutes on
one GPU with the defaults.

    pip install -e '.[bench,eval,test]'
    python bench/gpu_check.py                      # on the GPU machine
    python bench/gpu_check.py --device cpu --quick # a smoke run of every code path, anywhere

Training variants (the matched architecture of bench/common.py, batch 64, interleaved A B C ...,
medians, each step followed by a device synchronize):

    difflab_fp32, difflab_bf16, difflab_fp16   difflab's Trainer step with train.precision=fp32|bf16|fp16
                                               (fp16: with its gradient scaler); bf16 only where supported
    difflab_bf16_compile                       the same with train.compile=true (skipped with --no-compile)
    diffusers_fp32, diffusers_amp              UNet2DModel in a plain loop, fp32 and autocast (bf16 where
                                               supported, else fp16), channels_last

Last line: ``gpu=NAME train_ratio_vs_diffusers_fp32=X train_ratio_vs_diffusers_amp=Y`` (difflab's best
steps/s over diffusers'), plus sampling and FID-feature rates.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import CHANNELS, IMAGE_SIZE, difflab_config, diffusers_unet, interleave  # noqa: E402


def synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def images(n: int = 512):
    from difflab.data.dataset import ImageData

    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8),
                     None, "synthetic", 0)


def make_difflab(precision: str, batch: int, device: torch.device, workdir: Path, compile: bool = False) -> Callable[[], None]:
    from difflab.train import Trainer

    extra = [f"train.precision={precision}"] + (["train.compile=true"] if compile else [])
    trainer = Trainer(difflab_config(batch, extra), workdir / f"{precision}{'-c' if compile else ''}", data=images(),
                      progress=False, device=device)
    trainer.model.train()
    sums = torch.zeros(2, 4, device=trainer.device)
    return lambda: trainer._train_step(sums)


def make_diffusers(amp: torch.dtype | None, batch: int, device: torch.device) -> Callable[[], None]:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = diffusers_unet().train().to(device, memory_format=torch.channels_last)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    data = images().images
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = torch.randint(0, len(data), (batch,), generator=g)
        clean = (data[idx].float() / 127.5 - 1).to(device).contiguous(memory_format=torch.channels_last)
        noise = torch.randn(clean.shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        noisy = sched.add_noise(clean, noise, t)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.mse_loss(model(noisy, t).sample.float(), noise)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def sampling_rate(device: torch.device, batch: int, steps: int) -> float:
    from difflab.models.unet import UNet
    from difflab.runs import sampling_denoiser
    from difflab.samplers import SamplerConfig, sample
    from difflab.schedule import NoiseSchedule

    cfg = difflab_config(batch)
    model = UNet(cfg.model).to(device).eval().requires_grad_(False)
    den = sampling_denoiser(model, NoiseSchedule(cfg.schedule), cfg.loss)
    shape, scfg = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE), SamplerConfig(sampler="ddim", steps=steps)
    run = synced(lambda: sample(den, batch, shape, scfg, batch_size=batch, device=device, progress=False), device)
    run()  # warm-up
    t0 = time.perf_counter()
    run()
    return batch / (time.perf_counter() - t0)


def fid_feature_rate(device: torch.device, n: int) -> float:
    from difflab.metrics.inception import INPUT_SIZE, InceptionFeatures

    net = InceptionFeatures(device=device, batch_size=min(n, 200))
    x = torch.rand(n, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    net.forward_pixels(x[: min(n, 50)])  # warm-up
    t0 = time.perf_counter()
    net.forward_pixels(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check that every path runs (not a measurement)")
    args = p.parse_args()
    from difflab.devices import resolve_device

    device = resolve_device(args.device)
    if args.quick:
        args.batch, args.rounds, args.per_round = 4, 1, 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}); torch {torch.__version__}", flush=True)
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests" / "test_cuda.py")],
                               cwd=ROOT, capture_output=True, text=True)
        print("cuda tests:", (tests.stdout.strip().splitlines() or ["(no output)"])[-1], flush=True)
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    amp = torch.bfloat16 if bf16 else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants: dict[str, Callable[[], None]] = {"difflab_fp32": make_difflab("fp32", args.batch, device, work)}
        if bf16:
            variants["difflab_bf16"] = make_difflab("bf16", args.batch, device, work)
        variants["difflab_fp16"] = make_difflab("fp16", args.batch, device, work)
        if not args.no_compile and bf16:
            variants["difflab_bf16_compile"] = make_difflab("bf16", args.batch, device, work, compile=True)
        try:
            variants["diffusers_fp32"] = make_diffusers(None, args.batch, device)
            variants["diffusers_amp"] = make_diffusers(amp, args.batch, device)
        except ImportError:
            print("diffusers is not installed (pip install -e '.[bench]'): difflab variants only", flush=True)
        variants = {k: synced(v, device) for k, v in variants.items()}
        memory = {k: peak_memory_mib(v, device) for k, v in variants.items()}
        times = interleave(variants, args.rounds, args.per_round, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n| variant (batch {args.batch}) | s/step | images/s | peak GPU MiB |\n|---|---:|---:|---:|")
    for k, s in med.items():
        mem = "-" if memory[k] is None else f"{memory[k]:.0f}"
        print(f"| {k} | {s:.4f} | {args.batch / s:.1f} | {mem} |")
    best = min((s for k, s in med.items() if k.startswith("difflab")))
    samples = sampling_rate(device, 16 if args.quick else 256, 5 if args.quick else 20)
    fid = fid_feature_rate(device, 8 if args.quick else 1000)
    print(f"\nsampling (DDIM 20 steps, difflab bf16/auto): {samples:.1f} images/s; FID features: {fid:.1f} images/s")
    ratio = {k: f"{med[k] / best:.2f}" if k in med else "-" for k in ("diffusers_fp32", "diffusers_amp")}
    print(f"gpu={name.replace(' ', '_')} train_ratio_vs_diffusers_fp32={ratio['diffusers_fp32']} "
          f"train_ratio_vs_diffusers_amp={ratio['diffusers_amp']} sample_images_per_s={samples:.1f} fid_images_per_s={fid:.1f}")


if __name__ == "__main__":
    main()
