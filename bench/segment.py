"""Segmentation by diffusion (SegDiff, issue 23) against a plain segmenter at equal compute, on the
shared face-parsing pairs at 64 px (900 photos, 7 classes; the run's own validation split, 90 pairs).

    python bench/segment.py --data ../shared/data/face-parsing --out runs/seg --minutes 10,30,60

For each objective (``diffusion``: the mask sampled given the image; ``ce``: the same UNet as a one-pass
cross-entropy segmenter) one run is trained to each milestone of ``--minutes`` in turn (the run is
resumed to the next milestone, exactly as an uninterrupted run; each milestone's checkpoint is scored
before training goes on). At each milestone: ``difflab segment`` on the validation images (diffusion:
K samples per image for each ``--samples`` and each ``--steps``; ce: one pass) and ``difflab eval-seg``
against the true masks: mIoU, per-class IoU, pixel accuracy, the uncertainty ranking (error rate in the
10% most uncertain pixels against the rest), and seconds per image. Runs train alone on the machine.

Last line: ``miou_diffusion=.. miou_ce=.. minutes=.. ratio=..`` for the last milestone and the best
diffusion setting (ratio = miou_diffusion / miou_ce: above 1, diffusion wins).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import difflab_cli  # noqa: E402


def val_folder(data: Path, out: Path, size: int, fraction: float) -> Path:
    """The run's validation images (split by id as the trainer splits them), linked into one folder."""
    from difflab.data.paired import load_pairs, split_pairs

    folder = out / "val-images"
    if not folder.is_dir():
        pairs = load_pairs(data, size, progress=False)
        _, val = split_pairs(pairs, fraction)
        folder.mkdir(parents=True)
        images = {p.stem: p for p in (data / "images").iterdir()}
        for i in val.tolist():
            src = images[pairs.ids[i]]
            (folder / src.name).symlink_to(src.resolve())
    return folder


def trained_minutes(run: Path) -> float:
    if not (run / "latest.json").exists():
        return 0.0
    ckpt = json.loads((run / "latest.json").read_text())["checkpoint"]
    return json.loads((run / ckpt / "state.json").read_text())["elapsed_seconds"] / 60


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "face-parsing"))
    p.add_argument("--out", default="runs/seg")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--minutes", default="10,30,60", help="milestones, cumulative training minutes per objective")
    p.add_argument("--samples", default="1,4,16", help="diffusion: masks sampled per image")
    p.add_argument("--steps", default="10,25", help="diffusion: sampling steps (the run's sampler)")
    p.add_argument("--objectives", default="diffusion,ce",
                   help="runs: NAME[=key=value+key=value]; a NAME starting with ce trains the plain segmenter, e.g. "
                        "diffusion,ce,diffusion-add=model.cond_mode=add")
    p.add_argument("--overrides", default="segment.hflip=true", help="key=value settings of every run, comma separated")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = val_folder(data, out, args.image_size, 0.1)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for minutes in [float(m) for m in args.minutes.split(",")]:
        for spec in args.objectives.split(","):
            name, _, extra = spec.partition("=")
            objective = "ce" if name.startswith("ce") else "diffusion"
            settings_of_run = [o for o in args.overrides.split(",") if o] + [o for o in extra.split("+") if o]
            run = out / name
            done = trained_minutes(run)
            if done < minutes - 0.05:  # train (or resume) to this milestone
                budget = ["--minutes", f"{minutes - done:.3f}"]
                if done == 0:
                    difflab_cli("train", "--task", "segment", "--data", str(data), "--image-size", str(args.image_size),
                                "--objective", objective, "--out", str(run), "--no-progress", *budget, *settings_of_run)
                else:
                    difflab_cli("train", "--out", str(run), "--resume", "--no-progress", *budget)
            settings = [(1, 1)] if objective == "ce" else [(int(k), int(s)) for k in args.samples.split(",")
                                                           for s in args.steps.split(",")]
            for k, steps in settings:
                key = f"{name}-{minutes:g}min-K{k}-S{steps}"
                if key in results:
                    continue
                pred = out / "pred" / key
                flags = [] if objective == "ce" else ["--samples", str(k), "--steps", str(steps)]
                t0 = time.monotonic()
                difflab_cli("segment", "--run", str(run), "--images", str(val), "--out", str(pred), "--no-progress", *flags)
                seconds = time.monotonic() - t0
                scores = out / "pred" / f"{key}.json"
                difflab_cli("eval-seg", "--pred", str(pred), "--truth", str(data), "--only-predicted", "--json", str(scores))
                r = json.loads(scores.read_text())
                n = r["images"]
                results[key] = {"run": name, "objective": objective, "minutes": minutes, "samples": k, "steps": steps,
                                "miou": r["miou"], "iou": r["iou"], "pixel_accuracy": r["pixel_accuracy"],
                                "uncertainty": r.get("uncertainty"), "seconds_per_image": seconds / n, "images": n,
                                "train_minutes": trained_minutes(run)}
                results_file.write_text(json.dumps(results, indent=2))
                print(key, json.dumps({k2: results[key][k2] for k2 in ("miou", "pixel_accuracy", "seconds_per_image")}),
                      flush=True)
    classes = list(next(iter(results.values()))["iou"])
    head = " | ".join(classes)
    print(f"\n| run | minutes | K | steps | mIoU | {head} | pixel acc. | top-10% error / rest | s / image |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(classes) + "---:|---:|---:|")
    for r in results.values():
        unc = r.get("uncertainty") or {}
        ranking = f"{unc['error_rate_top']:.3f} / {unc['error_rate_rest']:.3f}" if unc.get("error_rate_top") is not None else "-"
        ious = " | ".join("-" if r["iou"][c] is None else f"{r['iou'][c]:.3f}" for c in classes)
        print(f"| {r['run']} | {r['minutes']:g} | {r['samples'] if r['objective'] != 'ce' else '-'} | "
              f"{r['steps'] if r['objective'] != 'ce' else '-'} | {r['miou']:.3f} | {ious} | {r['pixel_accuracy']:.3f} | "
              f"{ranking} | {r['seconds_per_image']:.3f} |")
    last = max(r["minutes"] for r in results.values())
    diff = [r for r in results.values() if r["run"] == "diffusion" and r["minutes"] == last]
    ce = [r for r in results.values() if r["run"] == "ce" and r["minutes"] == last]
    if diff and ce:
        best = max(diff, key=lambda r: r["miou"])
        print(f"miou_diffusion={best['miou']:.3f} (K={best['samples']}, steps={best['steps']}) miou_ce={ce[0]['miou']:.3f} "
              f"minutes={last:g} ratio={best['miou'] / ce[0]['miou']:.3f}")


if __name__ == "__main__":
    main()
