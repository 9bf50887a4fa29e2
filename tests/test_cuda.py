"""Checks that need a CUDA GPU: skipped on machines without one; `python bench/gpu_check.py` runs them
where there is one. What they pin down: the same seed gives the same images on the CPU and the GPU
(noise is drawn on the CPU), fp16 training with the gradient scaler on CUDA, FID features in true fp32."""
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny_run(tmp_path, *extra):
    from PIL import Image

    from difflab.cli import main

    data = tmp_path / "imgs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(16):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(data / f"{k}.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--image-size", "16", "--batch-size", "8",
                 "--max-steps", "4", "--no-progress", "train.sample_every=0", *extra]) == 0
    return out


def test_same_seed_same_images_on_cpu_and_gpu(tmp_path):
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample

    run_dir = _tiny_run(tmp_path, "--device", "cuda", "train.precision=fp32")
    cfg = SamplerConfig(sampler="dpmpp-2m-sde", steps=10)
    out = {}
    for device in ("cpu", "cuda"):
        run = load_run(run_dir, device=device)
        out[device] = sample(run.denoiser(precision="fp32"), 6, run.image_shape, cfg, seed=3, device=device, progress=False).cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], atol=2e-3, rtol=0)


def test_fp16_training_on_cuda_scales_the_loss(tmp_path):
    import json

    run_dir = _tiny_run(tmp_path, "--device", "cuda", "train.precision=fp16", "train.log_every=2")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert "grad_scale" in log[-1] and all(r["loss"] == r["loss"] for r in log)
    state = json.loads(next((run_dir / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert "grad_scaler" in state


def test_fid_features_agree_on_cpu_and_gpu():
    from difflab.metrics.inception import INPUT_SIZE, InceptionFeatures

    x = torch.rand(4, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    cpu = InceptionFeatures(device="cpu").forward_pixels(x)
    gpu = InceptionFeatures(device="cuda").forward_pixels(x)
    assert float((gpu - cpu).abs().max() / cpu.abs().max()) < 1e-4  # TF32 would give ~1e-3


def test_training_steps_and_sampling_steps_do_not_sync_with_the_host(tmp_path):
    """torch's sync debug mode raises on every operation that makes the host wait for the GPU: a
    training step between log and checkpoint steps, and a stochastic sampler's steps, must have none."""
    from difflab.config import resolve_config
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample
    from difflab.train import Trainer

    run_dir = _tiny_run(tmp_path, "--device", "cuda", "train.precision=bf16")
    cfg = resolve_config(preset="tiny", flags={"data.source": str(tmp_path / "imgs"), "data.image_size": 16,
                                               "train.batch_size": 8},
                         overrides=["train.sample_every=0", "train.log_every=1000", "train.checkpoint_every=1000"])
    trainer = Trainer(cfg, tmp_path / "nosync", progress=False, device="cuda")
    sums = torch.zeros(2, 4, device="cuda")
    trainer._train_step(sums)  # the first step allocates and warms up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer._train_step(sums)
        run = load_run(run_dir, device="cuda")
        sample(run.denoiser(), 4, run.image_shape, SamplerConfig(sampler="ddim", steps=5, eta=1.0), seed=0,
               device="cuda", progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
