"""Image-to-image on anime faces (issue 15): super-resolution 32 -> 64 px against bicubic upsampling,
the cascade (a 32 px base run + the SR run) against a single-stage 64 px run trained for the same
minutes, and the SDEdit / inpainting figures.

    python bench/img2img.py --data ../shared/data/anime-faces --minutes-base 15 --minutes-sr 15 --out runs/img2img
    # another SR stage beside the same base, single-stage and held-out sets, trained by steps:
    python bench/img2img.py --out runs/img2img-s700 --reuse runs/img2img --sr-steps 700 --stages train,sr

Stages (each kept when the command runs again):
1. split: the last 1000 ids (23000 ... 23999) are held out; training sees the other 23000.
2. train: base32 (`--image-size 32`, MB minutes), sr64 (`--task upscale --from 32 --image-size 64`, MS
   minutes), single64 (`--image-size 64`, MB + MS minutes); all with the `small` preset defaults.
3. super-resolution on the held-out faces: HR = the face at 64 px (difflab's loader), LR = HR downscaled
   to 32 px the way training pairs are made (bicubic, antialiased), stored as PNG; `difflab upscale` vs
   bicubic upsampling of the same PNGs: PSNR and SSIM against HR, FID/KID against the HR set.
4. the cascade (`difflab sample --run base32 --upscale-run sr64`), base32 + bicubic, and single64:
   n images each, FID/KID/LBP detection against the same HR set (1000 real faces never trained on).
5. figures (the base32 run, 32 px): SDEdit strengths 0.2 ... 0.8 on held-out faces and on crude
   colour-blob drawings; inpainting with replacement only (resample 1) and with RePaint's resampling
   (jump 5, resample 5).
Samplers: DDIM 25 steps eta 1 for the base and single-stage runs; the SR stage with its run's table
at 25 steps (DDIM, eta 0).

Last line: ``psnr_sr=.. psnr_bicubic=.. fid_sr=.. fid_bicubic=.. fid_cascade=.. fid_single=.. ratio=..``
(ratio = fid_single / fid_cascade: above 1, the cascade wins).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import difflab_cli  # noqa: E402

HELD_OUT = 1000
# what --reuse links from an earlier output folder: everything that does not depend on sr64
REUSED = ("train", "heldout", "heldout-64", "heldout-32", "bicubic-64", "bicubic-64.eval.json", "base32", "single64",
          "single", "single.eval.json", "base32-samples", "base32-bicubic", "base32-bicubic.eval.json")
SAMPLE = ["--sampler", "ddim", "--steps", "25", "--eta", "1"]


def split(data: Path, out: Path) -> tuple[Path, Path]:
    files = sorted((p for p in data.iterdir() if p.stem.isdigit()), key=lambda p: int(p.stem))
    train, held = out / "train", out / "heldout"
    for folder, chosen in ((train, files[:-HELD_OUT]), (held, files[-HELD_OUT:])):
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for f in chosen:
                (folder / f.name).symlink_to(f.resolve())
    return train, held


def save_pngs(images: torch.Tensor, folder: Path, names: list[str]) -> None:
    from difflab.data.dataset import to_uint8
    from difflab.visualize.images import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(images)
    for img, name in zip(u8, names):
        to_pil(img).save(folder / f"{name}.png")


def load_pngs(folder: Path, names: list[str]) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{n}.png").convert("RGB")).copy()).permute(2, 0, 1)
                        for n in names])


def evaluate(fake: Path, real: Path, out: Path) -> dict:
    res = out / f"{fake.name}.eval.json"
    if not res.exists():
        difflab_cli("eval", "--fake", str(fake), "--real", str(real), "--metrics", "fid,kid,detect", "--detectors", "lbp",
                    "--json", str(res), "--no-progress")
    return json.loads(res.read_text())


def figures(args, out: Path, held: Path, names: list[str]) -> None:
    from difflab.data.dataset import to_float
    from difflab.data.images import load_folder
    from difflab.edit import inpaint_batches, make_mask
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample_batches
    from difflab.visualize.images import save_grid

    run = load_run(out / "base32")  # the stage that makes faces at these budgets (single64 does not yet)
    den = run.denoiser()
    size = run.image_shape[1]
    faces = to_float(load_folder(held, size, progress=False).images[:3])
    # crude drawings: a skin-coloured face, a hair cap, two eyes, on white
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    drawings = []
    for hair, eyes in (((0.9, 0.5, 0.1), (0.1, 0.4, 0.9)), ((0.3, 0.3, 0.9), (0.9, 0.1, 0.1))):
        img = torch.ones(3, size, size)
        face = (xx / 0.6) ** 2 + ((yy - 0.15) / 0.7) ** 2 < 1
        cap = ((xx / 0.8) ** 2 + ((yy + 0.1) / 0.8) ** 2 < 1) & (yy < -0.05) | ((xx.abs() > 0.5) & (yy < 0.6) & (xx.abs() < 0.8))
        img[:, face] = torch.tensor([1.0, 0.85, 0.75])[:, None]
        img[:, cap] = torch.tensor(hair)[:, None]
        for cx in (-0.28, 0.28):
            img[:, ((xx - cx) / 0.12) ** 2 + ((yy - 0.15) / 0.16) ** 2 < 1] = torch.tensor(eyes)[:, None]
        drawings.append(img * 2 - 1)
    inputs = torch.cat([faces, torch.stack(drawings)])
    strengths = (0.2, 0.4, 0.6, 0.8)
    cfg = SamplerConfig(sampler="ddim", steps=25, eta=1.0)
    cols = [inputs]
    for s in strengths:
        cols.append(torch.cat([b for _, b in sample_batches(den, len(inputs), run.image_shape, cfg, seed=0, progress=False,
                                                            init=inputs, strength=s)]))
    grid = torch.stack(cols, 1).flatten(0, 1)
    for target in (ROOT / "bench" / "results" / "sdedit.png", ROOT / "docs" / "sdedit.png"):
        target.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, target, nrow=len(cols), scale=3)
    rows = []
    masks = [make_mask(k, size, torch.Generator().manual_seed(3)) for k in ("center", "left", "random-boxes")]
    ddpm = SamplerConfig(sampler="ddpm", steps=50)
    for face, mask in zip(faces, masks):
        shown = torch.where(mask, torch.zeros(()), face)
        row = [face, shown]
        for jump, resample in ((1, 1), (5, 5)):
            row.append(next(inpaint_batches(den, face[None], mask[None], 1, ddpm, jump=jump, resample=resample, seed=0,
                                            progress=False))[1][0])
        rows.append(torch.stack(row))
    grid = torch.cat(rows)
    for target in (ROOT / "bench" / "results" / "inpaint.png", ROOT / "docs" / "inpaint.png"):
        save_grid(grid, target, nrow=4, scale=3)
    print("figures: bench/results/sdedit.png (rows: 3 held-out faces, 2 drawings; columns: input, strength 0.2 ... 0.8), "
          "bench/results/inpaint.png (columns: original, masked, replacement only, RePaint jump 5 resample 5)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "anime-faces"))
    p.add_argument("--minutes-base", type=float, default=15)
    p.add_argument("--minutes-sr", type=float, default=15)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--out", default="runs/img2img")
    p.add_argument("--stages", default="train,sr,cascade,figures")
    p.add_argument("--sr-steps", type=int, default=0,
                   help="train sr64 for this many steps instead of --minutes-sr (equal compute whatever else runs)")
    p.add_argument("--reuse", help="an earlier --out: its split, held-out sets, base32, single64 and their samples "
                                   "are linked, not made again (a new sr64 is trained and everything using it redone)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    stages = set(args.stages.split(","))
    if args.reuse:
        out.mkdir(parents=True, exist_ok=True)
        for name in REUSED:
            src = Path(args.reuse).resolve() / name
            if src.exists() and not (out / name).exists():
                (out / name).symlink_to(src)
    train, held = split(Path(args.data), out)
    common = ["--data", str(train), "--no-progress"]
    sr_budget = ["--max-steps", str(args.sr_steps)] if args.sr_steps else ["--minutes", str(args.minutes_sr)]
    plan = [("base32", ["--image-size", "32", "--minutes", str(args.minutes_base)]),
            ("sr64", ["--image-size", "64", "--task", "upscale", "--from", "32", *sr_budget]),
            ("single64", ["--image-size", "64", "--minutes", str(args.minutes_base + args.minutes_sr)])]
    if "train" in stages:
        for name, flags in plan:
            if not (out / name / "model.safetensors").exists():
                difflab_cli("train", *common, *flags, "--out", str(out / name))
    steps = {name: json.loads((out / name / "latest.json").read_text()).get("step") for name, _ in plan}
    print("training steps:", steps)

    from difflab.data.dataset import to_float
    from difflab.data.images import load_folder
    from difflab.edit.upscale import resize
    from difflab.metrics.pixel import psnr, ssim

    names = [f.stem for f in sorted(held.iterdir(), key=lambda f: int(f.stem))]
    hr_dir, lr_dir, bic_dir, sr_dir = out / "heldout-64", out / "heldout-32", out / "bicubic-64", out / "sr-64"
    rows = {}
    if "sr" in stages:
        if not hr_dir.is_dir():
            folder = load_folder(held, 64, progress=False)
            loaded = [Path(r).stem for r in folder.paths]
            hr = folder.images[[loaded.index(n) for n in names]]
            save_pngs(to_float(hr), hr_dir, names)
            save_pngs(resize(to_float(hr), 32), lr_dir, names)
            save_pngs(resize(to_float(load_pngs(lr_dir, names)), 64), bic_dir, names)
        if not sr_dir.is_dir():
            difflab_cli("upscale", "--run", str(out / "sr64"), "--images", str(lr_dir), "--steps", "25", "--out", str(sr_dir),
                        "--no-progress")
        hr = load_pngs(hr_dir, names)
        for label, folder in (("bicubic", bic_dir), ("sr", sr_dir)):
            x = load_pngs(folder, names)
            ev = evaluate(folder, hr_dir, out)
            rows[label] = {"psnr": float(psnr(x, hr).mean()), "ssim": float(ssim(x, hr).mean()), "fid": ev["fid"],
                           "kid": ev["kid_mean"], "detect": ev.get("detect_rate")}
            print(label, json.dumps(rows[label]), flush=True)
        from difflab.visualize.images import save_grid
        first = names[:8]  # rows: the held-out face, bicubic, SR
        grid = torch.cat([to_float(load_pngs(folder, first)) for folder in (hr_dir, bic_dir, sr_dir)])
        save_grid(grid, out / "sr-heldout.png", nrow=len(first), scale=2)
        print(f"figure: {out / 'sr-heldout.png'} (rows: held-out face, bicubic, SR)")
    if "cascade" in stages:
        n = str(args.n)
        for name, cmd in (("cascade", ["sample", "--run", str(out / "base32"), "--upscale-run", str(out / "sr64"),
                                       "--upscale-steps", "25"]),
                          ("base32-samples", ["sample", "--run", str(out / "base32")]),
                          ("single", ["sample", "--run", str(out / "single64")])):
            if not (out / name).is_dir():
                difflab_cli(*cmd, "-n", n, *SAMPLE, "--format", "png", "--out", str(out / name), "--no-progress")
        bic = out / "base32-bicubic"
        if not bic.is_dir():
            ids = [str(k) for k in range(1, args.n + 1)]
            save_pngs(resize(to_float(load_pngs(out / "base32-samples", ids)), 64), bic, ids)
        for label, folder in (("cascade", out / "cascade"), ("base32+bicubic", bic), ("single64", out / "single")):
            ev = evaluate(folder, hr_dir, out)
            rows[label] = {"fid": ev["fid"], "kid": ev["kid_mean"], "detect": ev.get("detect_rate")}
            print(label, json.dumps(rows[label]), flush=True)
    if "figures" in stages:
        figures(args, out, held, names)
    (out / "results.json").write_text(json.dumps({"steps": steps, "rows": rows}, indent=2))
    print("\n| set | PSNR dB | SSIM | FID | KID x1000 | LBP detection |\n|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        ps = f"{r['psnr']:.2f}" if "psnr" in r else "-"
        ss = f"{r['ssim']:.4f}" if "ssim" in r else "-"
        det = "-" if r["detect"] is None else f"{r['detect']:.3f}"
        print(f"| {label} | {ps} | {ss} | {r['fid']:.2f} | {1000 * r['kid']:.2f} | {det} |")
    if {"sr", "bicubic", "cascade", "single64"} <= set(rows):
        print(f"psnr_sr={rows['sr']['psnr']:.2f} psnr_bicubic={rows['bicubic']['psnr']:.2f} fid_sr={rows['sr']['fid']:.2f} "
              f"fid_bicubic={rows['bicubic']['fid']:.2f} fid_cascade={rows['cascade']['fid']:.2f} "
              f"fid_single={rows['single64']['fid']:.2f} ratio={rows['single64']['fid'] / rows['cascade']['fid']:.3f}")


if __name__ == "__main__":
    main()
