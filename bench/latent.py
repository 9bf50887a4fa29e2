"""Latent diffusion on anime faces at 64 px (issue 21): an autoencoder trained here plus a UNet on its
latents, against the pixel-space 64 px model and the 32 -> 64 cascade of the image-to-image bench, at
equal total CPU time, all scored on the same 1000 held-out faces.

    python bench/latent.py --reuse runs/img2img-s --out runs/latent --total-minutes 24 --ae-minutes 8

Stages (each kept when the command runs again):
1. the split, held-out set and the pixel-space rows are linked from ``--reuse`` (bench/img2img.py's output:
   23000 training faces, 1000 held out, single64 and the cascade trained for 24 minutes in all).
2. ``ae``: ``difflab train-autoencoder`` (defaults: f = 4, 4 latent channels, L1 + KL) for AE minutes;
   ``ae-disc``: the same with the patch discriminator (``--disc``, switched on at ``loss.disc_start``).
   Both are scored by reconstructing the held-out faces (PSNR, SSIM, FID/KID against the faces).
3. the training faces are encoded once (both orientations; timed; the trainer then reads the cache).
4. ``ldm``: ``difflab train --latent-of ae`` (the default recipe, with hflip) for the minutes left of the total:
   total - AE training seconds - encoding seconds.
5. 1000 samples (DDIM 25 steps eta 1, as the pixel-space rows), FID/KID/LBP detection against the held-out
   faces; sampling images/s including decoding.
6. figures: docs/latent-pipeline.png (held-out faces | the 4 latent channels | reconstruction), the sample grid.

Last line: ``fid_latent=.. fid_single64=.. fid_cascade=.. ratio=..`` (ratio = fid_single64 / fid_latent:
above 1, the latent model wins at equal time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import difflab_cli  # noqa: E402
from img2img import SAMPLE, evaluate, load_pngs, save_pngs  # noqa: E402

REUSED = ("train", "heldout", "heldout-64", "single64", "single", "single.eval.json", "cascade", "cascade.eval.json",
          "base32-bicubic", "base32-bicubic.eval.json")


def elapsed(run: Path) -> tuple[int, float]:
    """(step, training seconds) of a run's newest checkpoint."""
    ckpt = json.loads((run / "latest.json").read_text())["checkpoint"]
    state = json.loads((run / ckpt / "state.json").read_text())
    return state["step"], state["elapsed_seconds"]


def encode_once(ae: Path, train: Path, image_size: int) -> dict:
    """Encode the training faces with the autoencoder run ``ae`` exactly as ``difflab train --latent-of``
    will (both orientations, the default precision), so the trainer reads them from the cache; the
    encoding's seconds, timed apart from the training it would otherwise hide in."""
    from difflab.config import LatentConfig
    from difflab.data import load_dataset
    from difflab.latent import codec_from_run, encode_images, latent_settings
    from difflab.precision import Precision, autocast_dtype

    found = latent_settings(ae)
    lat = LatentConfig(**{k.split(".", 1)[1]: v for k, v in found.items() if k.startswith("latent.")})
    images = load_dataset(str(train), image_size, 3, progress=False).images
    codec = codec_from_run(lat, autocast=autocast_dtype(Precision.AUTO, torch.device("cpu")))
    t0 = time.monotonic()
    z = encode_images(codec, images, hflip=True, progress=False)
    return {"seconds": time.monotonic() - t0, "images": len(images), "shape": list(z.shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", required=True, help="bench/img2img.py's output folder (split, held-out faces, pixel rows)")
    p.add_argument("--out", default="runs/latent")
    p.add_argument("--total-minutes", type=float, default=24.0, help="autoencoder + encoding + diffusion (default 24)")
    p.add_argument("--ae-minutes", type=float, default=8.0)
    p.add_argument("--disc-start", type=int, default=500, help="ae-disc: the step the discriminator loss starts")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--stages", default="ae,encode,ldm,sample,speed,figures")
    p.add_argument("--rounds", type=int, default=3, help="speed: interleaved rounds (ldm, single64, ldm, ...)")
    p.add_argument("--speed-batch", type=int, default=64, help="speed: images per round")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in REUSED:
        src = Path(args.reuse).resolve() / name
        if src.exists() and not (out / name).exists():
            (out / name).symlink_to(src)
    train, hr_dir = out / "train", out / "heldout-64"
    names = [f.stem for f in sorted(hr_dir.iterdir(), key=lambda f: int(f.stem))]
    stages = set(args.stages.split(","))
    rows: dict[str, dict] = {}
    timing: dict[str, float] = {}

    from difflab.autoencoder import load_autoencoder, reconstruct
    from difflab.data.dataset import to_float
    from difflab.metrics.pixel import psnr, ssim

    hr = load_pngs(hr_dir, names)
    for name, extra in (("ae", []), ("ae-disc", ["--disc", f"loss.disc_start={args.disc_start}"])):
        run = out / name
        if "ae" in stages and not (run / "report.json").exists():
            difflab_cli("train-autoencoder", "--data", str(train), "--image-size", "64", "--minutes", str(args.ae_minutes),
                        "--out", str(run), "--no-progress", *extra)
        if not (run / "report.json").exists():
            continue
        rec_dir = out / f"{name}-rec"
        if not rec_dir.is_dir():
            model, _, _ = load_autoencoder(run)
            save_pngs(to_float(reconstruct(model, hr)), rec_dir, names)
        x = load_pngs(rec_dir, names)
        ev = evaluate(rec_dir, hr_dir, out)
        step, secs = elapsed(run)
        rows[f"{name} reconstructions"] = {"psnr": float(psnr(x, hr).mean()), "ssim": float(ssim(x, hr).mean()),
                                           "fid": ev["fid"], "kid": ev["kid_mean"], "detect": ev.get("detect_rate"),
                                           "minutes": secs / 60, "steps": step}
        print(name, json.dumps(rows[f"{name} reconstructions"]), flush=True)

    ae, ldm = out / "ae", out / "ldm"
    enc_file = out / "encode.json"
    if "encode" in stages and not enc_file.exists():
        enc_file.write_text(json.dumps(encode_once(ae, train, 64)))
    if enc_file.exists():
        timing["encode_s"] = json.loads(enc_file.read_text())["seconds"]
    if "ldm" in stages and not (ldm / "latest.json").exists():
        _, ae_secs = elapsed(ae)
        minutes = args.total_minutes - ae_secs / 60 - timing["encode_s"] / 60
        print(f"ldm: {minutes:.2f} minutes (total {args.total_minutes} - autoencoder {ae_secs / 60:.2f} - encoding "
              f"{timing['encode_s'] / 60:.2f})", flush=True)
        difflab_cli("train", "--latent-of", str(ae), "--data", str(train), "--minutes", f"{minutes:.3f}", "--out", str(ldm),
                    "--no-progress", "data.augment.hflip=true")
    samples = out / "ldm-samples"
    if "sample" in stages and ldm.exists():
        if not samples.is_dir():
            t0 = time.monotonic()
            difflab_cli("sample", "--run", str(ldm), "-n", str(args.n), *SAMPLE, "--format", "png", "--out", str(samples),
                        "--no-progress")
            (out / "ldm-sampling-wall.json").write_text(json.dumps({"seconds": time.monotonic() - t0}))
        ev = evaluate(samples, hr_dir, out)
        rec = json.loads((out / "ldm-samples.sampling.json").read_text())
        step, secs = elapsed(ldm)
        _, ae_secs = elapsed(ae)
        rows["latent (ae + ldm)"] = {"fid": ev["fid"], "kid": ev["kid_mean"], "detect": ev.get("detect_rate"),
                                     "minutes": (ae_secs + secs + timing.get("encode_s", 0)) / 60, "steps": step,
                                     "sample_images_per_s": args.n / rec["seconds"]}
    for label, name in (("single64 (pixel)", "single"), ("cascade 32 -> 64", "cascade"),
                        ("base32 + bicubic", "base32-bicubic")):
        if (out / f"{name}.eval.json").exists():
            ev = json.loads((out / f"{name}.eval.json").read_text())
            rows[label] = {"fid": ev["fid"], "kid": ev["kid_mean"], "detect": ev.get("detect_rate")}
    if "speed" in stages and ldm.exists():
        timing.update(sampling_speed(out, rounds=args.rounds, batch=args.speed_batch))
    if "figures" in stages and (ae / "report.json").exists():
        figures(out, ae, hr_dir, names, samples)
    (out / "results.json").write_text(json.dumps({"rows": rows, "timing": timing}, indent=2))
    print("\n| set | minutes | PSNR dB | SSIM | FID | KID x1000 | LBP detection |\n|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        cells = [f"{r['minutes']:.1f}" if "minutes" in r else "24 (img2img)"]
        cells += [f"{r[k]:.2f}" if k in r else "-" for k in ("psnr",)] + [f"{r['ssim']:.4f}" if "ssim" in r else "-"]
        cells += [f"{r['fid']:.2f}", f"{1000 * r['kid']:.2f}", "-" if r["detect"] is None else f"{r['detect']:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if "latent (ae + ldm)" in rows and "single64 (pixel)" in rows:
        lat, single = rows["latent (ae + ldm)"], rows["single64 (pixel)"]
        casc = rows.get("cascade 32 -> 64", {}).get("fid", float("nan"))
        print(f"fid_latent={lat['fid']:.2f} fid_single64={single['fid']:.2f} fid_cascade={casc:.2f} "
              f"ratio={single['fid'] / lat['fid']:.3f}")


def sampling_speed(out: Path, rounds: int, batch: int) -> dict[str, float]:
    """Images/s of DDIM 25 eta 1 (the bench's sampler) for the latent run (decoding included) and the
    pixel-space single64 run, interleaved (ldm, single64, ldm, ...) in this process; medians and ratio."""
    import statistics

    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample

    cfg = SamplerConfig(sampler="ddim", steps=25, eta=1.0)
    runs = {"ldm": load_run(out / "ldm"), "single64": load_run(out / "single64")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for name, run in runs.items():
            t0 = time.monotonic()
            run.to_pixels(sample(run.denoiser(), batch, run.image_shape, cfg, seed=r, batch_size=batch, progress=False))
            times[name].append(time.monotonic() - t0)
            print(f"speed round {r}: {name} {batch / times[name][-1]:.2f} images/s", flush=True)
    med = {k: batch / statistics.median(v) for k, v in times.items()}
    print(f"| run | images/s (median of {rounds}) |\n|---|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    print(f"sampling ratio ldm/single64 = {med['ldm'] / med['single64']:.1f}x", flush=True)
    return {f"sample_images_per_s_{k}": v for k, v in med.items()} | {"sampling_ratio": med["ldm"] / med["single64"]}


def figures(out: Path, ae: Path, hr_dir: Path, names: list[str], samples: Path) -> None:
    """docs/latent-pipeline.png: rows of held-out faces | their 4 latent channels (each stretched to
    [-1, 1], nearest-upsampled) | the reconstruction; bench/results/latent-samples.png: 64 samples."""
    import torch.nn.functional as F

    from difflab.autoencoder import load_autoencoder
    from difflab.data.dataset import to_float
    from difflab.visualize.images import save_grid

    model, _, _ = load_autoencoder(ae)
    x = to_float(load_pngs(hr_dir, names[:6]))
    with torch.no_grad():
        mean, _ = model.encode(x)
        rec = model.decode(mean).clamp(-1, 1)
    cols = [x]
    for c in range(mean.shape[1]):
        ch = mean[:, c : c + 1]
        lo, hi = ch.amin(dim=(2, 3), keepdim=True), ch.amax(dim=(2, 3), keepdim=True)
        ch = (ch - lo) / (hi - lo).clamp(min=1e-6) * 2 - 1
        cols.append(F.interpolate(ch, size=x.shape[-2:], mode="nearest").expand(-1, 3, -1, -1))
    cols.append(rec)
    grid = torch.stack(cols, 1).flatten(0, 1)
    for target in (ROOT / "docs" / "latent-pipeline.png", ROOT / "bench" / "results" / "latent-pipeline.png"):
        target.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, target, nrow=len(cols), scale=2)
    if samples.is_dir():
        imgs = to_float(load_pngs(samples, [str(k) for k in range(1, 65)]))
        for target in (ROOT / "docs" / "latent-samples.png", ROOT / "bench" / "results" / "latent-samples.png"):
            save_grid(imgs, target, nrow=8, scale=2)
    print("figures: docs/latent-pipeline.png (face | latent channels 1-4 | reconstruction), docs/latent-samples.png")


if __name__ == "__main__":
    main()
