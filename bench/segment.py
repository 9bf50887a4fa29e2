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

``--steps-per-minute R`` turns each milestone into ``round(R * minutes)`` optimizer steps (R measured from
a solo run; both objectives cost the same per step, so equal steps are equal compute); with it,
``--parallel`` trains the runs of a milestone side by side (the cores split between them) and the scores
do not depend on what else the machine was doing. The seconds per image still do: score on a quiet machine.

Last line: ``miou_diffusion=.. miou_ce=.. minutes=.. ratio=..`` for the last milestone and the best
diffusion setting (ratio = miou_diffusion / miou_ce: above 1, diffusion wins).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def trained_steps(run: Path) -> int:
    if not (run / "latest.json").exists():
        return 0
    return int(json.loads((run / "latest.json").read_text())["step"])


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
    p.add_argument("--steps-per-minute", type=float, default=None,
                   help="budget each milestone as round(R * minutes) optimizer steps instead of wall minutes")
    p.add_argument("--parallel", action="store_true",
                   help="with --steps-per-minute: train a milestone's runs side by side, the cores split between them")
    args = p.parse_args()
    if args.parallel and args.steps_per_minute is None:
        p.error("--parallel needs --steps-per-minute (wall-minute budgets are only fair for runs trained alone)")
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = val_folder(data, out, args.image_size, 0.1)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    specs = []
    for spec in args.objectives.split(","):
        name, _, extra = spec.partition("=")
        objective = "ce" if name.startswith("ce") else "diffusion"
        specs.append((name, objective, [o for o in args.overrides.split(",") if o] + [o for o in extra.split("+") if o]))
    for minutes in [float(m) for m in args.minutes.split(",")]:
        commands = []
        for name, objective, settings_of_run in specs:
            run = out / name
            if args.steps_per_minute is not None:
                target = round(args.steps_per_minute * minutes)
                if trained_steps(run) >= target:
                    continue
                budget = ["--max-steps", str(target)]
            else:
                done = trained_minutes(run)
                if done >= minutes - 0.05:
                    continue
                budget = ["--minutes", f"{minutes - done:.3f}"]
            if (run / "latest.json").exists():  # resume to this milestone
                commands.append(["train", "--out", str(run), "--resume", "--no-progress", *budget])
            else:
                commands.append(["train", "--task", "segment", "--data", str(data), "--image-size", str(args.image_size),
                                 "--objective", objective, "--out", str(run), "--no-progress", *budget, *settings_of_run])
        if args.parallel and len(commands) > 1:
            threads = str(max(1, (os.cpu_count() or 1) // len(commands)))
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            procs = []
            for c in commands:
                print("$ OMP_NUM_THREADS=" + threads, "difflab", " ".join(c), flush=True)
                procs.append(subprocess.Popen([sys.executable, "-m", "difflab", *c], env=env))
            if any([proc.wait() for proc in procs]):
                sys.exit("a training run failed")
        else:
            for c in commands:
                difflab_cli(*c)
        for name, objective, _ in specs:
            run = out / name
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
                                "train_minutes": trained_minutes(run), "train_steps": trained_steps(run)}
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
