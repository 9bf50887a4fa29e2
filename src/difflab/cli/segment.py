"""``difflab segment``: segmentation masks of images from a segmentation run (``difflab train --task
segment``; :mod:`difflab.edit.segment`).

For each input image (fitted to the run's size, with a note), it writes into ``--out``:

- ``<id>.png``: the mask, class indices as an 8-bit grey PNG (:func:`difflab.data.paired.save_mask`);
  with ``--samples K`` > 1 the majority vote of the K sampled masks (ties: the lowest class index);
- ``<id>_overlay.png``: the mask's class colours over the image;
- ``<id>_uncertainty.png`` (K > 1, or a ``ce`` run): per-pixel entropy of the vote distribution (of
  the softmax, for a ``ce`` run) over log(classes), 0..255 (white = the classes equally likely).

``<id>`` is the file's path below ``--images`` without its extension (``--images`` a paired folder:
below its ``images/``), the id :mod:`difflab.metrics.segmentation` (``difflab eval-seg``) pairs with the
true masks. A square input of another size than the run's is answered at its own size (the class
distribution, votes or softmax, upsampled bilinearly before the argmax), so that ``eval-seg`` scores it
against its own mask; a non-square input's mask covers its central square at the run's size (the mIoU
that ``--truth`` prints is measured at the run's size). Sample k of image i is sample i K + k of the set, with seed
(seed, i K + k): results do not depend on ``--batch-size``. ``--figure`` draws the first images'
rows (image | truth | 4 sampled masks | ensembled mask | uncertainty) and one mask's progression from
noise (the argmax of the x0 estimate at about 8 steps). The record goes beside ``--out``
(``<out>.sampling.json``, :mod:`difflab.records`).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflab.cli.common import (
    RUN_SAMPLER,
    Command,
    add_run_options,
    add_sampler_options,
    load_run_for,
    out_file,
    out_folder,
    positive_int,
    sampler_config,
)
from difflab.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command runs
    import torch

    from difflab.edit import Inputs
    from difflab.runs import LoadedRun

#: rows of the --figure (the first images), sampled masks shown per row, states of the progression row
FIGURE_ROWS = 6
FIGURE_SAMPLES = 4
PROGRESSION_FRAMES = 9  # x_T's estimate ... the sample: about 8 steps apart


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    add_sampler_options(p, default=RUN_SAMPLER)
    p.add_argument("--images", "--image", dest="images", required=True,
                   help="an image, a folder of images (searched recursively) or a paired folder (its images/ are used)")
    p.add_argument("--out", help="folder for <id>.png, <id>_overlay.png, <id>_uncertainty.png "
                                 "(default: RUN/segmented/<input name>)")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="masks sampled per image (default 1); more: their majority vote and an uncertainty map "
                        "(a ce run makes one mask per image and ignores this)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per network call (default 64)")
    p.add_argument("--truth", help="true masks for --figure and a printed mIoU: a paired folder (images/, masks/, "
                                   "classes.txt) or a folder of class-index PNGs named like the inputs")
    p.add_argument("--figure", help="also save a figure (.png): image | truth | sampled masks | ensembled mask | "
                                    "uncertainty for the first images, and one mask's progression from noise")
    p.add_argument("--no-progress", action="store_true")


def _ids(files: tuple[Path, ...], root: Path) -> list[str]:
    """Each input's id: its path below ``root`` (a folder) without the extension, else its stem."""
    if not root.is_dir():
        return [f.stem for f in files]
    return [f.relative_to(root).with_suffix("").as_posix() for f in files]


def segment_inputs(args: argparse.Namespace, run: LoadedRun,
                   note: Callable[[str], None] = lambda text: None) -> tuple[Inputs, list[str]]:
    """The images ``--images`` names, fitted to the segmentation ``run`` (``note`` gets each change), and their ids."""
    from difflab.edit import load_inputs

    if not run.config.segment.active:
        raise ConfigError(f"--run {args.run} is not a segmentation run (train one with difflab train --task segment "
                          "--data PAIRED_DIR)")
    root = Path(args.images).expanduser()
    if (root / "images").is_dir() and (root / "classes.txt").is_file():  # a paired folder: its images
        note(f"--images {root} is a paired folder: segmenting its images/")
        root = root / "images"
    inputs = load_inputs(root, run.image_shape[1], 3, "--images")
    for text in inputs.notes:
        note(text)
    return inputs, _ids(inputs.files, root)


def load_truth(path: str, ids: list[str], size: int, classes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """True masks (uint8 (size, size)) by id, for the ids that have one: from a paired folder (its
    classes must be the run's) or a folder of class-index PNGs (fitted like the inputs: the central
    square, nearest neighbour)."""
    from difflab.data.images import find_images
    from difflab.data.paired import _resize_mask, _square, load_pairs, read_classes, read_mask
    from difflab.errors import DataError

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"--truth {root} is not a folder (a paired folder, or a folder of class-index PNG masks)")
    if (root / "classes.txt").is_file():
        found = read_classes(root / "classes.txt")
        if found != classes:
            raise DataError(f"--truth {root} has the classes {', '.join(found)}, the run {', '.join(classes)}")
        pairs, wanted = load_pairs(root, size, progress=False), set(ids)
        return {key: pairs.masks[i] for i, key in enumerate(pairs.ids) if key in wanted}
    files = {f.relative_to(root).with_suffix("").as_posix(): f for f in find_images(root)}
    out: dict[str, torch.Tensor] = {}
    for key in ids:
        if key in files:
            m = read_mask(files[key], len(classes))
            m = _square(m[None], m)[1]
            out[key] = _resize_mask(m, (size, size)).contiguous()
    if not out:
        raise DataError(f"--truth {root} holds no mask named like the inputs (e.g. {ids[0]}.png)")
    return out


def run_segment(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from difflab.config import SegObjective, to_dict
    from difflab.data.dataset import to_uint8
    from difflab.data.decode import open_image
    from difflab.data.paired import overlay, save_mask
    from difflab.edit.inputs import to_tensor
    from difflab.edit.segment import ce_logits, segment_batches, to_mask, uncertainty_u8, vote
    from difflab.io import atomic_path
    from difflab.metrics.segmentation import confusion, scores
    from difflab.records import write_record
    from difflab.samplers import make_grid
    from difflab.visualize.images import to_pil

    figure = out_file(args.figure, "--figure", (".png",)) if args.figure else None
    if args.out:
        out_folder(args.out, "--out")
    run = load_run_for(args, segment=True)
    inputs, ids = segment_inputs(args, run, note=lambda text: print(f"note: {text}"))
    seg = run.config.segment
    K, size = seg.num_classes, run.image_shape[1]
    ce = seg.objective is SegObjective.CE
    if ce and args.samples > 1:
        print(f"note: --run {args.run} is a plain segmenter (segment.objective=ce): one mask per image, --samples ignored")
    samples = 1 if ce else args.samples
    cfg = sampler_config(args, run.config.sampler)
    if not ce:
        make_grid(run.schedule, cfg)  # a bad --steps fails here, before any work
    truth = load_truth(args.truth, ids, size, seg.classes) if args.truth else {}
    out = Path(args.out).expanduser() if args.out else run.path / "segmented" / Path(args.images).expanduser().stem
    out.mkdir(parents=True, exist_ok=True)
    denoiser = run.denoiser(args.clip, args.precision)
    shown: dict[int, dict[str, torch.Tensor]] = {}  # what the figure shows of its rows
    conf = torch.zeros(K, K, dtype=torch.int64)  # against --truth, for the ids that have a true mask

    def write(i: int, mask: torch.Tensor, probs: torch.Tensor | None, drawn: torch.Tensor) -> None:
        key, image = ids[i], to_uint8(inputs.images[i])
        if key in truth:
            conf.add_(confusion(mask, truth[key], K))
        unc = None if probs is None else uncertainty_u8(probs)
        if figure is not None and i < FIGURE_ROWS:
            shown[i] = {"image": image, "mask": mask, "drawn": drawn[:FIGURE_SAMPLES],
                        **({"uncertainty": unc} if unc is not None else {})}
        w, h = inputs.sizes[i]
        if w == h != size:  # a square input of another size: written at its own size (to score against its mask)
            dist = probs if probs is not None else F.one_hot(mask.long(), K).permute(2, 0, 1).float()
            dist = F.interpolate(dist[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            mask = dist.argmax(0).to(torch.uint8)
            unc = None if probs is None else uncertainty_u8(dist)
            image = to_uint8(to_tensor(open_image(inputs.files[i], 3)))
        target = out / f"{key}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_mask(mask, target)
        pictures = {"_overlay": overlay(image, mask)}
        if unc is not None:
            pictures["_uncertainty"] = unc
        for suffix, picture in pictures.items():
            with atomic_path(out / f"{key}{suffix}.png") as tmp:
                to_pil(picture).save(tmp, format="PNG")

    t0 = time.monotonic()
    if ce:
        from tqdm.auto import tqdm

        for lo in tqdm(range(0, len(inputs.images), args.batch_size), desc="segmenting (one pass)", unit="batch",
                       disable=args.no_progress):
            x = inputs.images[lo:lo + args.batch_size].to(run.device)
            with torch.no_grad():
                logits = ce_logits(denoiser.model, x, K, autocast=denoiser.autocast, memory_format=torch.channels_last)
            probs = logits.softmax(dim=1).cpu()
            for j, mask in enumerate(to_mask(probs)):
                write(lo + j, mask, probs[j], mask[None])
    else:
        pending: list[torch.Tensor] = []
        done = 0  # images written
        for _, x in segment_batches(denoiser, inputs.images, K, cfg, samples=samples, seed=args.seed,
                                    batch_size=args.batch_size, device=run.device, progress=not args.no_progress):
            pending.extend(to_mask(x).cpu())
            while len(pending) >= samples:  # samples arrive in order: image i's are i K ... i K + K - 1
                masks, pending = torch.stack(pending[:samples]), pending[samples:]
                if samples > 1:
                    mask, votes = vote(masks, K)
                    write(done, mask, votes, masks)
                else:
                    write(done, masks[0], None, masks)
                done += 1
    seconds = time.monotonic() - t0
    miou = scores(conf, seg.classes)["miou"] if truth else None
    if figure is not None:
        _figure(figure, run, denoiser, cfg, inputs, ids, shown, truth, ce, args.seed)
    odd = sum(w != h for w, h in inputs.sizes)
    notes = list(inputs.notes) + ([f"{odd} non-square input(s): their masks cover the central square, at the run's "
                                   f"{size}x{size} px"] if odd else [])
    record = write_record(out, {
        "task": "segment", "run": str(run.path), "step": run.step, "classes": list(seg.classes),
        "objective": seg.objective.value, "samples_per_image": samples, "seed": args.seed, "weights": args.weights,
        "clip": args.clip, "precision": args.precision, "sampler": None if ce else to_dict(cfg),
        "ensemble": None if samples == 1 else "majority vote of the samples' argmax masks, ties to the lowest class index",
        "uncertainty": ("softmax entropy / log(classes)" if ce else "vote entropy / log(classes)" if samples > 1 else None),
        "inputs": [str(f) for f in inputs.files], "ids": ids, "notes": notes, "miou": miou, "seconds": seconds,
    })
    print(f"segmented {len(ids)} image(s) ({samples} sample(s) each) into {out} in {seconds:.1f} s; record: {record}"
          + (f"; mIoU against --truth ({len(truth)} masks): {miou:.4f}" if miou is not None else "")
          + (f"; figure: {figure}" if figure else ""))
    return 0


def _figure(path: Path, run: LoadedRun, denoiser: Any, cfg: Any, inputs: Inputs, ids: list[str],
            shown: dict[int, dict[str, torch.Tensor]], truth: dict[str, torch.Tensor], ce: bool, seed: int) -> None:
    """Rows image | truth | sampled masks | ensembled mask | uncertainty for the first images, and (a
    diffusion run) one mask's progression: the argmax of the x0 estimate from x_T to the sample of
    image 1's first sample (same seed, so its last frame is that sample)."""
    import torch

    from difflab.data.dataset import to_uint8
    from difflab.data.paired import colorize
    from difflab.edit.segment import to_mask
    from difflab.visualize.figure import image_grid_figure, save_figure
    from difflab.visualize.progress import record_trajectory

    size = run.image_shape[1]
    blank = torch.full((3, size, size), 255, dtype=torch.uint8)
    rows: list[list[torch.Tensor]] = []
    titles: list[list[str]] = []
    for i in sorted(shown):
        s = shown[i]
        row, names = [s["image"]], ["image"]
        if truth:
            row.append(colorize(truth[ids[i]]) if ids[i] in truth else blank)
            names.append("truth" if ids[i] in truth else "(no truth)")
        drawn = s["drawn"]
        if not ce and len(drawn) > 1:
            row += [colorize(m) for m in drawn]
            names += [f"sample {k + 1}" for k in range(len(drawn))]
        row.append(colorize(s["mask"]))
        names.append("mask (softmax)" if ce else "mask" if len(drawn) == 1 else "vote")
        if "uncertainty" in s:
            row.append(s["uncertainty"].expand(3, -1, -1))
            names.append("uncertainty")
        rows.append(row)
        titles.append(names)
    row_titles = [ids[i][-14:] for i in sorted(shown)]
    if not ce:
        traj = record_trajectory(denoiser, 1, run.image_shape, cfg, frames=PROGRESSION_FRAMES, seed=seed, progress=False,
                                 lowres=inputs.images[:1].to(run.device))
        rows.append([to_uint8(inputs.images[0])] + [colorize(to_mask(x0)[0].cpu()) for x0 in traj.x0])
        titles.append(["image 1"] + [("sample" if t is None else f"x0 at t={t:.0f}") for t in traj.t])
        row_titles.append("from noise")
    cols = max(len(r) for r in rows)
    panel = torch.stack([torch.stack(r + [blank] * (cols - len(r))) for r in rows])
    cell_titles = [t + [""] * (cols - len(t)) for t in titles]
    save_figure(image_grid_figure([panel], titles=cell_titles, row_titles=row_titles), path)


COMMANDS: dict[str, Command] = {
    "segment": ("segmentation masks of images with a segmentation run (--task segment): samples, vote, uncertainty",
                add_segment_arguments, run_segment),
}
