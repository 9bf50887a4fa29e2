"""The anime-face homework's recipe ladder (issue 16): each rung trained for the same CPU minutes at
32 px, 1000 faces sampled with the sampler its recipe stores in the run, scored by FID, KID and both
detection rates against one reference.

Data split (the same for every rung): the last 1000 ids of ``../shared/data/anime-faces`` (23017 ...
24016: the numbering has gaps) are kept out; the rungs train on the other 23,000. Reference
statistics: 5000 of those 23,000 (a fixed draw, ``random.Random(0)``) at their own 96 px, so the
kept-out faces give the real-vs-real floor of the same table. (The issue asks for the 23,000
themselves; their Inception features take ~30 CPU-minutes here, 5000 take ~6 and estimate the same
mean and covariance; the floor row is measured against the same 5000.)

Each rung is ``name`` (a recipe) or ``label=recipe+key=value+key=value`` (a recipe with overrides, for
objective candidates); a GAN rung (issue 18) names ``gan:stylegan`` or ``gan:ddgan`` as its recipe
(``difflab gan train --kind ...``, its ``small`` preset; sampled with ``difflab gan sample``). A latent
rung (issue 21's pipeline) names ``latent:SIZE:AE_MINUTES``: an autoencoder trained AE_MINUTES at SIZE px
(``difflab train-autoencoder``, its defaults), the faces encoded once (timed), then ``difflab train
--latent-of`` (the ``best`` recipe, hflip, the rung's overrides) for the rest of the budget: autoencoder
+ encoding + diffusion = the rung's minutes. Its faces are SIZE px (the homework's own 64, say), scored
against the same reference as the 32 px rungs.
Stages are kept when the command runs again: a run that reached its minutes, a sampled folder, a
scored folder; a step-budgeted rung (below) that was stopped part-way goes on from its last checkpoint
(exact resume), a timed one starts again. ``--minutes 20,60`` trains each rung 20 minutes, scores it, then
resumes the same run to 60 minutes in total (a copy, so the 20-minute run stays) and scores that.

    python bench/ladder.py --minutes 20 --rungs hw-simple,hw-medium,hw-strong,best --out runs/ladder
    python bench/ladder.py --minutes 20 --rungs best,hw-strong,stylegan=gan:stylegan,ddgan=gan:ddgan --out runs/ladder
    python bench/ladder.py --minutes 20 --rungs latent64=latent:64:6 --out runs/ladder

Training runs one at a time and nothing else should run beside it (the budget is wall-clock minutes).
``--steps-per-minute LABEL=R,...`` turns a rung's minutes into ``round(R * minutes)`` optimizer steps (for
a latent rung: R times the minutes its autoencoder and encoding left), R measured by that rung's own
timed 20-minute run alone on the machine; such rungs may then train beside other work, on fewer threads,
and reach the same step as a timed run would (their faces do not depend on the load).
Last line: ``best_fid_20min=... best_fid_60min=...`` (the lowest FID among the rungs at each budget).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import difflab_cli  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "anime-faces"
HELD_OUT, N_REF = 1000, 5000


def link_folder(folder: Path, ids: list[int], source: Path) -> Path:
    """A folder of symlinks ``<id>.jpg`` -> the source faces (made once)."""
    if folder.exists() and len(list(folder.iterdir())) == len(ids):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        link = folder / f"{i}.jpg"
        if not link.exists():
            os.symlink(source.resolve() / f"{i}.jpg", link)
    return folder


def split(out: Path, source: Path) -> tuple[Path, Path, Path]:
    """(training folder, kept-out folder, reference folder). The faces are numbered with gaps: the
    last 1000 ids are kept out; the reference is 5000 draws from ids 0 ... 22999, all of them present."""
    ids = sorted(int(f.stem) for f in source.glob("*.jpg") if f.stem.isdigit())
    train_ids, held_ids = ids[:-HELD_OUT], ids[-HELD_OUT:]
    ref_ids = sorted(random.Random(0).sample(range(23000), N_REF))
    if not set(ref_ids) <= set(train_ids):
        raise SystemExit(f"{source}: the reference draw names ids that are missing or kept out")
    return (link_folder(out / "train", train_ids, source), link_folder(out / "heldout", held_ids, source),
            link_folder(out / f"real-{N_REF}", ref_ids, source))


def parse_rung(text: str) -> tuple[str, str, list[str]]:
    """``label=recipe+k=v+k=v`` or ``recipe`` -> (label, recipe, overrides)."""
    label, _, spec = text.partition("=") if "=" in text.split("+")[0] else (text, "", text)
    recipe, *overrides = spec.split("+")
    return label, recipe, overrides


def log_steps(run: Path) -> dict:
    """The step of the run's latest checkpoint, and the last logged record (loss, images/s), if any."""
    log = run / "log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1]) if log.exists() else {}
    return {"last_log": last, "step": json.loads((run / "latest.json").read_text())["step"]}


def budget_flags(minutes: float, rate: float | None) -> tuple[list[str], list[str]]:
    """The training arguments for ``minutes`` of training: wall minutes, or ``rate`` steps per minute as a
    step budget (``--minutes 0``: no time limit, in case a resumed run's config carries one; an override,
    last, because overrides outrank flags and the rung's own ``train.max_steps``)."""
    if rate is None:
        return ["--minutes", f"{minutes:.3f}"], []
    return ["--minutes", "0"], [f"train.max_steps={round(rate * minutes)}"]


def train_latent(run: Path, recipe: str, overrides: list[str], data: Path, minutes: float,
                 rate: float | None) -> dict:
    """A ``latent:SIZE:AE_MINUTES`` rung from scratch: autoencoder, encoding, then the diffusion model for
    the minutes left; returns the split of the budget."""
    from latent import elapsed, encode_once

    try:
        _, size, ae_minutes = recipe.split(":")
        size_px, ae_min = int(size), float(ae_minutes)
    except ValueError:
        raise SystemExit(f"rung recipe {recipe!r}: a latent rung is latent:SIZE:AE_MINUTES, e.g. latent:64:6") from None
    ae = run.parent / f"{run.name}-ae"
    if not (ae / "report.json").exists():
        if ae.exists():
            shutil.rmtree(ae)
        difflab_cli("train-autoencoder", "--data", str(data), "--image-size", str(size_px), "--minutes", str(ae_min),
                    "--out", str(ae), "--no-progress")
    encoded = encode_once(ae, data, size_px)
    _, ae_s = elapsed(ae)
    rest = minutes - (ae_s + encoded["seconds"]) / 60
    if rest <= 0:
        raise SystemExit(f"rung {run.name}: the autoencoder ({ae_s / 60:.1f} min) and encoding leave no time of {minutes:g}")
    print(f"{run.name}: diffusion for {rest:.2f} minutes ({minutes:g} - autoencoder {ae_s / 60:.2f} - encoding "
          f"{encoded['seconds'] / 60:.2f})", flush=True)
    flags, steps = budget_flags(rest, rate)
    difflab_cli("train", "--latent-of", str(ae), "--data", str(data), "--out", str(run), "--no-progress", *flags,
                "data.augment.hflip=true", "train.max_steps=1000000", *overrides, *steps)
    return {"autoencoder_minutes": ae_s / 60, "encoding_minutes": encoded["seconds"] / 60, "diffusion_minutes": rest}


BUDGET = "ladder-budget.json"  # in a step-budgeted run: the step its training goes to, written before it starts


def stopped_on_the_way(run: Path, steps: int) -> bool:
    """Whether ``run`` is a step-budgeted training toward ``steps`` that stopped (a killed job, a session
    cut off) after writing a checkpoint."""
    try:
        return json.loads((run / BUDGET).read_text())["steps"] == steps and (run / "latest.json").is_file()
    except (OSError, ValueError, KeyError):
        return False


def mark_budget(run: Path, rate: float | None, minutes: float) -> None:
    if rate is not None:
        run.mkdir(parents=True, exist_ok=True)
        (run / BUDGET).write_text(json.dumps({"steps": round(rate * minutes)}) + "\n")


def train(run: Path, recipe: str, overrides: list[str], data: Path, minutes: float, resume_from: Path | None,
          rate: float | None = None) -> None:
    done = run / "ladder-trained.json"
    if done.exists():
        return
    split_of_budget: dict = {}
    gan = recipe.startswith("gan:")
    command = ["gan", "train"] if gan else ["train"]
    latent = recipe.startswith("latent:")
    resumed = rate is not None and not latent and stopped_on_the_way(run, round(rate * minutes))
    if run.exists() and not resumed:
        shutil.rmtree(run)  # an unfinished timed run (its minutes are spoilt) or a stale copy: start again
    if resumed:  # a step budget survives an interruption (exact resume): go on from the last checkpoint
        difflab_cli(*command, "--out", str(run), "--resume", "--no-progress", *sum(budget_flags(minutes, rate), []))
    elif resume_from is not None:  # continue the shorter run, in a copy
        shutil.copytree(resume_from, run, ignore=shutil.ignore_patterns("faces", "ladder-*", "grid.png", "curves.png"))
        shorter = json.loads((resume_from / "ladder-trained.json").read_text())
        split_of_budget = {k: shorter[k] for k in ("autoencoder_minutes", "encoding_minutes") if k in shorter}
        if split_of_budget:  # a latent rung: the autoencoder is kept, the diffusion model gets the extra minutes
            split_of_budget["diffusion_minutes"] = minutes - sum(split_of_budget.values())
        extra = minutes - shorter["minutes"]
        if rate is None:
            budget = ["--minutes", str(extra)]
        else:  # the step the whole budget reaches at the rung's rate
            flags, steps = budget_flags(split_of_budget.get("diffusion_minutes", minutes), rate)
            budget = flags + steps
            if not split_of_budget:
                mark_budget(run, rate, minutes)
        difflab_cli(*command, "--out", str(run), "--resume", "--no-progress", *budget)
    elif latent:
        split_of_budget = train_latent(run, recipe, overrides, data, minutes, rate)
    else:
        what = ["--kind", recipe[4:]] if gan else ["--recipe", recipe]
        flags, steps = budget_flags(minutes, rate)
        mark_budget(run, rate, minutes)
        difflab_cli(*command, *what, "--data", str(data), "--image-size", "32", "--out", str(run), "--no-progress",
                    *flags, "train.max_steps=1000000", *overrides, *steps)
    budget_kind = {"budget": "wall minutes"} if rate is None else {"budget": "steps", "steps_per_minute": rate}
    if resumed:
        budget_kind["resumed_from_checkpoint"] = True
    done.write_text(json.dumps({"minutes": minutes, **log_steps(run), **split_of_budget, **budget_kind}) + "\n")


def is_gan(run: Path) -> bool:
    return json.loads((run / "config.json").read_text()).get("family") == "gan"


def sample(run: Path, n: int, jpeg_quality: int) -> Path:
    faces = run / "faces"
    record = run / "ladder-sampled.json"
    if not record.exists():
        if faces.exists():
            shutil.rmtree(faces)
        for stale in run.glob("faces.sampling*.json"):
            stale.unlink()
        difflab_cli(*(["gan", "sample"] if is_gan(run) else ["sample"]), "--run", str(run), "-n", str(n), "--out",
                    str(faces), "--seed", "0", "--grid", str(run / "grid.png"), "--jpeg-quality", str(jpeg_quality),
                    "--no-progress")
        record.write_text((run / "faces.sampling.json").read_text())  # difflab sample's record, beside the folder
    return faces


def score(run: Path, faces: Path, real: Path, label: str) -> dict:
    out = run / "ladder-eval.json" if label != "floor" else run / "floor-eval.json"
    if not out.exists() or json.loads(out.read_text()).get("precision") is None:  # scored before pr was measured
        difflab_cli("eval", "--real", str(real), "--fake", str(faces), "--metrics", "fid,kid,pr,detect",
                    "--detectors", "lbp,animeface", "--json", str(out), "--no-progress")
    return json.loads(out.read_text())


def figures(run: Path, results: Path, name: str) -> None:
    """The run's loss curves (``difflab curves``) and its first 64 faces, copied to ``results``."""
    if not (run / "curves.png").exists() and (run / "log.jsonl").exists() and not is_gan(run):  # diffusion logs only
        difflab_cli("curves", "--run", str(run), "--out", str(run / "curves.png"))
    results.mkdir(parents=True, exist_ok=True)
    for src, suffix in ((run / "grid.png", "grid"), (run / "curves.png", "curves")):
        if src.exists():
            shutil.copyfile(src, results / f"{name}-{suffix}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--rungs", default="hw-simple,hw-medium,hw-strong,best")
    p.add_argument("--minutes", default="20", help="comma list of budgets, ascending (each resumes the last)")
    p.add_argument("-n", type=int, default=1000, help="faces per rung")
    p.add_argument("--out", default="runs/ladder")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "ladder"),
                   help="where the grids and loss curves are copied (default bench/results/ladder)")
    p.add_argument("--stage", choices=["all", "train"], default="all",
                   help="train: only the timed training (then run again with all to sample and score, which may "
                        "share the machine)")
    p.add_argument("--steps-per-minute", default="", metavar="LABEL=R,...",
                   help="step budgets for these rungs: R optimizer steps per minute, measured by the rung's own timed "
                        "run alone on the machine (see the docstring)")
    p.add_argument("--jpeg-quality", type=int, default=95,
                   help="quality of the hand-in JPEGs (default 95: every table in BENCHMARKS.md so far; difflab sample "
                        "writes 100 by default, which scores ~10 FID lower on the same images)")
    args = p.parse_args()
    try:
        rates = {k: float(v) for k, v in (item.split("=") for item in args.steps_per_minute.split(",") if item)}
    except ValueError:
        p.error(f"--steps-per-minute {args.steps_per_minute!r}: expected LABEL=R,... with R a number")
    out = Path(args.out)
    budgets = [float(m) for m in args.minutes.split(",")]
    train_dir, held, real = split(out, Path(args.data))
    floor = score(out, held, real, "floor") if args.stage == "all" else None
    rows = [("real (kept-out faces)", "-", "-", "-", {**floor, "images_per_s": float("nan")} if floor else floor)]
    best: dict[float, float] = {}
    for budget in budgets:  # every rung at one budget before the next budget
        for text in args.rungs.split(","):
            label, recipe, overrides = parse_rung(text)
            run = out / f"{label}-{budget:g}"
            shorter = [b for b in budgets if b < budget]
            train(run, recipe, overrides, train_dir, budget, out / f"{label}-{shorter[-1]:g}" if shorter else None,
                  rates.get(label))
            if args.stage == "train":
                continue
            res = score(run, sample(run, args.n, args.jpeg_quality), real, label)
            figures(run, Path(args.results), f"{label}-{budget:g}")
            cfg = json.loads((run / "config.json").read_text())
            sampled = json.loads((run / "ladder-sampled.json").read_text())
            if cfg.get("family") == "gan":
                name = f"{cfg['kind']}-{sampled['nfe_per_image']}"
            else:
                s = cfg["sampler"]
                name = f"{s['sampler']}-{sampled['nfe_per_image']}" + (f"-eta{s['eta']:g}" if s["sampler"] == "ddim" else "")
            steps = json.loads((run / "ladder-trained.json").read_text()).get("step", "?")
            res = {**res, "images_per_s": sampled["n"] / sampled["seconds"] if sampled.get("seconds") else float("nan")}
            rows.append((label, f"{budget:g}", str(steps), name, res))
            best[budget] = min(best.get(budget, float("inf")), res["fid"])
    if args.stage == "train":
        return
    print("\n| rung | minutes | steps | sampler | FID | KID x1000 | precision | recall | detect lbp | detect animeface "
          "| images/s sampling |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, minutes, steps, name, r in rows:
        print(f"| {label} | {minutes} | {steps} | {name} | {r['fid']:.1f} | {1000 * r['kid_mean']:.1f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['detect_rate_lbp']:.3f} | {r['detect_rate_animeface']:.3f} "
              f"| {r['images_per_s']:.1f} |")
    print(" ".join(f"best_fid_{b:g}min={best[b]:.1f}" for b in budgets))


if __name__ == "__main__":
    main()
