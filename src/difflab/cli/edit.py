"""``difflab edit`` (SDEdit) and ``difflab inpaint`` (RePaint): image-to-image on a trained run.

Both take one image or a folder (``--image``), write ``<input name>-<k>.png`` for k = 1 ... K into
``--out`` with the record beside it (``<folder>.sampling.json``, :mod:`difflab.records`), and can
save a figure (``--grid``): one row per input, the input (masked, for inpainting) then its K results.
Output j of input i is image i K + j of the set, with seed (seed, i K + j), so results do not depend
on the batch size.

A latent run (:mod:`difflab.latent`) edits in its latent space: the inputs are encoded by its frozen
autoencoder, SDEdit and RePaint run on the latents (an inpainting mask is taken to the latent grid,
a cell regenerated when any of its pixels is), and the results are decoded; inpainting then puts the
input's own pixels back outside the mask, so the kept region is the input's exactly, as in pixel space.
(At ``--strength 0`` a latent run returns the autoencoder's reconstruction of the input.)
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflab.cli.common import (
    RUN_SAMPLER,
    Command,
    add_condition_options,
    add_run_options,
    add_sampler_options,
    check_outputs,
    choices,
    load_run_for,
    positive_int,
    sampler_config,
)
from difflab.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command runs
    from difflab.samplers.base import Callback


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, what: str) -> None:
    add_run_options(p)
    add_condition_options(p)
    p.add_argument("--image", required=True, help="an image file, or a folder of them (each is edited)")
    p.add_argument("-n", type=positive_int, default=4, help=f"{what} per input image (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", help=f"folder for <input>-1.png ... (default: RUN/{what}/<input name>)")
    p.add_argument("--grid", help="also save a figure to this file (.png or .jpg): one row per input, the input then its results")
    p.add_argument("--no-progress", action="store_true")


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    _common(p, "edits")
    add_sampler_options(p, default=RUN_SAMPLER)
    p.add_argument("--strength", type=_strength, default=0.5,
                   help="how far to noise the input: 0 returns it, 1 ignores it (plain sampling); default 0.5. The "
                        "sampler runs its --steps from timestep round(strength (T - 1)) down")


def add_inpaint_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.edit import MaskKind

    _common(p, "inpaintings")
    add_sampler_options(p, default="ddpm, 50 steps (RePaint's sampler); ddim also works")
    masks = p.add_mutually_exclusive_group(required=True)
    masks.add_argument("--mask", help="mask image of the input's size: white = regenerate, black = keep")
    masks.add_argument("--mask-kind", choices=choices(MaskKind),
                       help="a generated mask (random-boxes: one per input, from --seed)")
    p.add_argument("--jump", type=positive_int, default=5,
                   help="RePaint: grid points to noise back at each resampling (default 5)")
    p.add_argument("--resample", type=positive_int, default=5,
                   help="RePaint: passes over each stretch of the grid (1 = replacement only; default 5, ~5x the network calls)")


def _prepare(args: argparse.Namespace, what: str) -> tuple[Any, Any, list[Any], dict[str, Any], Path, Path | None]:
    """The run, inputs (notes printed), condition rows for every output, output folder and figure path."""
    grid_file = check_outputs(args)
    run = load_run_for(args, latent=True)
    inputs, reqs, rows = prepare_inputs(args, run, what, note=lambda text: print(f"note: {text}"))
    src = Path(args.image).expanduser()
    out = Path(args.out).expanduser() if args.out else run.path / what / src.stem
    return run, inputs, reqs, rows, out, grid_file


def prepare_inputs(args: argparse.Namespace, run: Any, what: str,
                   note: Callable[[str], None] = lambda text: None) -> tuple[Any, list[Any], dict[str, Any]]:
    """What ``edit`` and ``inpaint`` (flags ``args``; ``what``: "edits" or "inpaintings") work on with
    ``run``: the inputs (:class:`~difflab.edit.Inputs`; ``note`` is called with each of their notes
    once they are read), the condition asked for, and the rows of every output: ``images`` (each input
    ``-n`` times) and the condition's keywords."""
    import torch

    from difflab.captions import condition_rows, requests
    from difflab.edit import load_inputs

    channels, size = run.pixel_shape[0], run.pixel_shape[1]
    inputs = load_inputs(args.image, size, channels)
    for text in inputs.notes:
        note(text)
    reqs = requests(run.config.cond, args.classes, args.label, args.prompt)
    if len(reqs) > 1:
        raise ConfigError(f"{what} takes at most one condition (--class, --label or --prompt) for all its inputs; "
                          f"got {len(reqs)}")
    total = len(inputs.images) * args.n
    cond = {k: v if v.shape[0] == 1 else v[:1] for k, v in condition_rows(run.config.cond, reqs, 1).items()}
    images = inputs.images.repeat_interleave(args.n, 0)
    assert images.shape[0] == total and images.dtype == torch.float32
    return inputs, reqs, {"images": images, **cond}


def _finish(args: argparse.Namespace, run: Any, inputs: Any, reqs: list[Any], out: Path, grid_file: Path | None,
            results: Any, shown_inputs: Any, record: dict[str, Any], what: str, plain_names: bool = False) -> int:
    """Write the results as <input>-<k>.png (<input>.png with ``plain_names`` and -n 1), the record and the figure."""
    import torch

    from difflab.data.dataset import to_uint8
    from difflab.io import atomic_path
    from difflab.records import conditions, write_record
    from difflab.visualize.images import save_grid, to_pil

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    kept: list[torch.Tensor] = []
    for idx, imgs in results:
        for k, img in zip(idx, imgs):
            i, j = divmod(k, args.n)
            stem = inputs.files[i].stem
            target = out / (f"{stem}.png" if plain_names and args.n == 1 else f"{stem}-{j + 1}.png")
            with atomic_path(target) as tmp:
                to_pil(to_uint8(img[None].cpu())[0]).save(tmp, format="PNG")
            if j == 0:
                kept.append(shown_inputs[i])
            kept.append(img.cpu())
    seconds = time.monotonic() - t0
    total = len(inputs.images) * args.n
    path = write_record(out, {
        "run": str(run.path), "step": run.step, "n": total, "per_input": args.n, "seed": args.seed,
        "weights": args.weights, "clip": args.clip, "precision": args.precision,
        "inputs": [str(f) for f in inputs.files], "notes": list(inputs.notes),
        "guidance": getattr(args, "guidance", None), "guidance_interval": getattr(args, "guidance_interval", None),
        "conditions": conditions(reqs, total, run.config.cond.schema), "seconds": seconds, **record,
    })
    if grid_file is not None:
        save_grid(torch.stack(kept), grid_file, nrow=args.n + 1)
    print(f"wrote {total} {what} of {len(inputs.images)} input(s) to {out} in {seconds:.1f} s; record: {path}"
          + (f"; figure: {grid_file}" if grid_file else ""))
    return 0


# The results of each command, from its flags, a loaded run and its prepared inputs: (an iterator of
# (indices, images in [-1, 1]) batches, the inputs as its figure shows them, the record's task fields).
# The iterators do the work lazily; ``callback`` sees every sampler step (difflab serve's progress).
Results = tuple[Iterator[tuple[range, Any]], Any, dict[str, Any]]


def _decoded(run: Any, results: Iterator[tuple[range, Any]], precision: str, keep: Any = None,
             known: Any = None) -> Iterator[tuple[range, Any]]:
    """``results`` as images: a latent run's batches decoded (pixel-space runs: unchanged); with ``keep``
    (bool masks, True = regenerated) the ``known`` images' pixels are put back where it is False."""
    import torch

    for idx, x in results:
        x = run.to_pixels(x, precision)
        if keep is not None:
            rows = slice(idx.start, idx.stop)
            x = torch.where(keep[rows].to(x.device), x, known[rows].to(x.device))
        yield idx, x


def run_edit(args: argparse.Namespace) -> int:
    run, inputs, reqs, rows, out, grid_file = _prepare(args, "edits")
    results, shown, record = edit_results(args, run, inputs, rows)
    return _finish(args, run, inputs, reqs, out, grid_file, results, shown, record, "edits")


def _network_inputs(run: Any, inputs: Any, args: argparse.Namespace) -> Any:
    """The inputs as the network denoises them (a latent run's latents), each encoded once and then
    repeated ``-n`` times, like ``rows["images"]``."""
    return run.to_latents(inputs.images, args.precision, args.batch_size).repeat_interleave(args.n, 0)


def edit_results(args: argparse.Namespace, run: Any, inputs: Any, rows: dict[str, Any], callback: Callback = None) -> Results:
    """``difflab edit``'s results (SDEdit at ``--strength``) for :func:`prepare_inputs`'s inputs and rows."""
    from difflab.config import to_dict
    from difflab.samplers import make_grid, sample_batches

    cfg = sampler_config(args, run.config.sampler)
    grid = make_grid(run.schedule, cfg, args.strength)  # a bad --steps fails here, before any work
    cond = {k: v for k, v in rows.items() if k != "images"}
    init = _network_inputs(run, inputs, args)  # a latent run edits its latents
    denoiser = run.denoiser(args.clip, args.precision, guidance=args.guidance, guidance_interval=args.guidance_interval)
    results = sample_batches(denoiser, len(init), run.image_shape, cfg, seed=args.seed, batch_size=args.batch_size,
                             device=run.device, progress=not args.no_progress, callback=callback, init=init,
                             strength=args.strength, **cond)
    results = _decoded(run, results, args.precision)
    start_t = None if args.strength == 1.0 else float(grid.t[0])
    return results, inputs.images, {
        "task": "sdedit", "strength": args.strength, "start_timestep": start_t,
        "steps_run": 0 if args.strength == 0 else len(grid),
        "sampler": to_dict(cfg), "grid_kind": cfg.grid_kind.value,
    }


def run_inpaint(args: argparse.Namespace) -> int:
    run, inputs, reqs, rows, out, grid_file = _prepare(args, "inpaintings")
    results, shown, record = inpaint_results(args, run, inputs, rows)
    return _finish(args, run, inputs, reqs, out, grid_file, results, shown, record, "inpaintings")


def inpaint_results(args: argparse.Namespace, run: Any, inputs: Any, rows: dict[str, Any], callback: Callback = None) -> Results:
    """``difflab inpaint``'s results (RePaint with ``--mask`` or ``--mask-kind``) for :func:`prepare_inputs`'s
    inputs and rows."""
    import torch

    from difflab.config import to_dict
    from difflab.edit import downsample_mask, inpaint_batches, load_mask, make_mask
    from difflab.edit.inpaint import DEFAULT_SAMPLER, network_calls
    from difflab.samplers import image_generators, make_grid

    cfg = sampler_config(args, DEFAULT_SAMPLER)
    size = run.pixel_shape[1]
    if args.mask:
        masks = torch.stack([load_mask(args.mask, size, wh) for wh in inputs.sizes])
    elif args.mask_kind == "random-boxes":
        masks = torch.stack([make_mask(args.mask_kind, size, g) for g in image_generators(args.seed, range(len(inputs.images)))])
    else:
        masks = make_mask(args.mask_kind, size)[None].expand(len(inputs.images), -1, -1, -1)
    steps = len(make_grid(run.schedule, cfg))
    images, cond = rows["images"], {k: v for k, v in rows.items() if k != "images"}
    regen = masks.repeat_interleave(args.n, 0)
    denoiser = run.denoiser(args.clip, args.precision, guidance=args.guidance, guidance_interval=args.guidance_interval)
    # the mask on the network's grid (factor 1 in pixel space); the decoded results get the input's own
    # pixels back outside the mask
    latents = _network_inputs(run, inputs, args)
    factor = size // run.image_shape[1]
    results = inpaint_batches(denoiser, latents, downsample_mask(regen, factor), len(images), cfg, jump=args.jump,
                              resample=args.resample, seed=args.seed, batch_size=args.batch_size, device=run.device,
                              progress=not args.no_progress, callback=callback, **cond)
    results = _decoded(run, results, args.precision, keep=regen, known=images)
    shown = torch.where(masks, torch.zeros(()), inputs.images)  # regenerated region shown mid-grey
    return results, shown, {
        "task": "inpaint", "mask": args.mask, "mask_kind": args.mask_kind, "jump": args.jump, "resample": args.resample,
        "network_calls_per_image": network_calls(steps, args.jump, args.resample),
        "sampler": to_dict(cfg), "grid_kind": cfg.grid_kind.value,
    }


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    add_sampler_options(p, default="the super-resolution run's [sampler] table")
    p.add_argument("--images", "--image", dest="image", required=True,
                   help="a low-resolution image or a folder of them (resized to the run's --from size first, with a note)")
    p.add_argument("-n", type=positive_int, default=1, help="upscalings per input (default 1: <input>.png; more: <input>-k.png)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", help="folder for the upscaled images (default: RUN/upscaled/<input name>)")
    p.add_argument("--grid", help="also save a figure (.png or .jpg): one row per input, its bicubic upsampling then the results")
    p.add_argument("--no-progress", action="store_true")


def run_upscale(args: argparse.Namespace) -> int:
    grid_file = check_outputs(args)
    run = load_run_for(args)
    inputs = upscale_inputs(args, run, note=lambda text: print(f"note: {text}"))
    results, shown, record = upscale_results(args, run, inputs)
    out = Path(args.out).expanduser() if args.out else run.path / "upscaled" / Path(args.image).expanduser().stem
    return _finish(args, run, inputs, [], out, grid_file, results, shown, record, "upscaled", plain_names=True)


def upscale_inputs(args: argparse.Namespace, run: Any, note: Callable[[str], None] = lambda text: None) -> Any:
    """``difflab upscale``'s inputs (``--images``, fitted to the super-resolution ``run``'s --from size;
    ``note`` is called with each change made)."""
    from difflab.edit import load_inputs

    up = run.config.upscale
    if not up.active:
        raise ConfigError(f"--run {args.run} is not a super-resolution run (train one with --task upscale --from SIZE)")
    inputs = load_inputs(args.image, up.from_size, run.image_shape[0], "--images")
    for text in inputs.notes:
        note(text)
    return inputs


def upscale_results(args: argparse.Namespace, run: Any, inputs: Any, callback: Callback = None) -> Results:
    """``difflab upscale``'s results for :func:`upscale_inputs`'s inputs."""
    from difflab.config import to_dict
    from difflab.edit.upscale import resize, upscale_batches

    up, size = run.config.upscale, run.image_shape[1]
    cfg = sampler_config(args, run.config.sampler)
    denoiser = run.denoiser(args.clip, args.precision)
    low = inputs.images.repeat_interleave(args.n, 0)
    results = upscale_batches(denoiser, low, up, size, cfg, seed=args.seed, batch_size=args.batch_size,
                              device=run.device, progress=not args.no_progress, callback=callback)
    return results, resize(inputs.images, size), {
        "task": "upscale", "from_size": up.from_size, "size": size, "sampler": to_dict(cfg),
        "grid_kind": cfg.grid_kind.value,
    }


COMMANDS: dict[str, Command] = {
    "edit": ("SDEdit: noise images part-way and denoise them with a trained run", add_edit_arguments, run_edit),
    "inpaint": ("inpaint the masked (white) region of images with a trained run (RePaint)", add_inpaint_arguments,
                run_inpaint),
    "upscale": ("upscale images with a super-resolution run (--task upscale)", add_upscale_arguments, run_upscale),
}
