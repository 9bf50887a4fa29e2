"""The model side of ``difflab serve``: one loaded run (and optionally a super-resolution run), the
``--out`` folder, and the translation of a page's request into a difflab command line.

Every request becomes the argument list of the command that reproduces it (``difflab sample``,
``edit``, ``inpaint`` or ``upscale``), which is parsed by difflab's own parser and run by the same
functions as that command (:func:`difflab.cli.sample.plan_sample`, :func:`difflab.cli.edit.prepare_inputs`
and its ``*_results``), on the run loaded once at start. So a result on the page and the command shown
beside it are one computation: the command writes the same pixels, and PNG files of the same bytes.

Everything the server writes is inside ``out``:

| folder                        | what                                                        |
| ----------------------------- | ----------------------------------------------------------- |
| ``uploads/<sha256[:16]>.ext`` | uploaded images, as uploaded                                |
| ``masks/<sha256[:16]>.png``   | inpainting masks drawn with the brush (white = regenerate)  |
| ``<task>/<job id>/k.png``     | the results of one request, and ``job.json`` (its command)  |

Files are named to the page by *refs*, paths relative to ``out`` of exactly those shapes
(:data:`REF`); nothing else is ever read or served.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import re
import secrets
import shlex
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflab.errors import ConfigError, DataError, DifflabError
from difflab.serve.jobs import Job

TASKS = ("generate", "edit", "inpaint", "upscale")
#: The image formats an upload may have (Pillow's names) and the extension it is stored under.
UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
#: A file the server wrote: an upload, a mask, or result k of a job.
REF = re.compile(r"(?:uploads/[0-9a-f]{16}\.(?:png|jpg|webp|bmp|gif)|masks/[0-9a-f]{16}\.png"
                 r"|(?:generate|edit|inpaint|upscale)/[0-9a-f]{12}/[0-9]{1,4}\.png)")
MAX_PROMPT = 500  # characters


def sampler_names() -> list[str]:
    from difflab.samplers import SamplerKind

    return [k.value for k in SamplerKind]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``difflab serve`` flags set the upload limits and the queue)."""

    images: int = 16  # -n
    steps: int = 1000
    guidance: float = 20.0
    jump: int = 50
    resample: int = 20
    upload_bytes: int = 8 << 20
    upload_side: int = 4096  # pixels, either side


def shown(value: float) -> str:
    """A number as a command-line argument: as short as it reads back exactly (2, 0.6, 1e-05)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


class Form:
    """A request's fields, read with range checks whose messages name the page's field and the flag."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError("the request must be a JSON object of fields")
        self.data = data

    def text(self, key: str, default: str = "") -> str:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected text, got {type(value).__name__}")
        return str(value)

    def integer(self, key: str, label: str, lo: int, hi: int, default: int | None = None) -> int:
        raw = self.data.get(key, default)
        text = str(raw).strip() if raw is not None else ""
        if not re.fullmatch(r"[+-]?\d{1,12}", text) or not lo <= int(text) <= hi:
            raise ConfigError(f"{label} must be a whole number from {lo} to {hi}, got {text!r}")
        return int(text)

    def number(self, key: str, label: str, lo: float, hi: float, default: float | None = None) -> float:
        raw = self.data.get(key, default)
        text = str(raw).strip() if raw is not None else ""
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not lo <= value <= hi:  # NaN fails too
            raise ConfigError(f"{label} must be a number from {shown(lo)} to {shown(hi)}, got {text!r}")
        return value

    def seed(self) -> int:
        """``seed``: a number in [0, 2^32), or "random" (or empty) for a fresh one, shown with the result."""
        text = self.text("seed", "random").strip().lower()
        if text in ("", "random"):
            return secrets.randbelow(2**32)
        return self.integer("seed", "Seed (--seed)", 0, 2**32 - 1)

    def choice(self, key: str, label: str, options: list[str], default: str) -> str:
        value = self.text(key, default) or default
        if value not in options:
            raise ConfigError(f"{label} must be one of {', '.join(options)}, got {value!r}")
        return value


@dataclass
class Prepared:
    """A checked request: its job (work not yet run) and the arguments parsed from its command."""

    job: Job
    args: argparse.Namespace


class Studio:
    """The loaded run(s) and ``out``; :meth:`prepare` turns a request into a queued-ready :class:`Job`."""

    def __init__(self, run: Any, run_arg: str, out: str | Path, *, upscaler: Any = None, upscaler_arg: str | None = None,
                 device: str = "auto", limits: Limits = Limits()) -> None:
        self.run, self.run_arg = run, run_arg
        self.upscaler, self.upscaler_arg = upscaler, upscaler_arg
        self.out_arg = str(out)
        self.out = Path(out).expanduser().resolve()
        self.device, self.limits = device, limits
        self._prepare_lock = threading.Lock()  # text encoding and input decoding, one request at a time
        for folder in ("uploads", "masks", *TASKS):
            (self.out / folder).mkdir(parents=True, exist_ok=True)

    # -- what the page is told about the run -----------------------------------------------------
    def info(self) -> dict[str, Any]:
        from difflab import __version__
        from difflab.edit.inpaint import DEFAULT_SAMPLER
        from difflab.samplers import SamplerKind

        run, cfg = self.run, self.run.config
        schema = cfg.cond.schema
        kind = "text" if cfg.cond.captions else "none" if schema is None else "classes" if len(schema.attributes) == 1 \
            else "tags"
        T = run.schedule.num_timesteps
        up = None
        if self.upscaler is not None:
            sr = self.upscaler
            up = {"run": self.upscaler_arg, "step": sr.step, "from_size": sr.config.upscale.from_size,
                  "size": sr.image_shape[1], "channels": sr.image_shape[0], "sampler": sr.config.sampler.sampler.value,
                  "steps": sr.config.sampler.num_steps(sr.schedule.num_timesteps)}
        return {
            "version": __version__, "run": self.run_arg, "step": run.step, "out": self.out_arg,
            "image_size": run.pixel_shape[1], "channels": run.pixel_shape[0], "timesteps": T,
            "cond": {"kind": kind, "attributes": list(schema.attributes) if schema else [],
                     "classes": [list(c) for c in schema.classes] if schema else []},
            "samplers": sampler_names(),
            "sampler": cfg.sampler.sampler.value, "steps": cfg.sampler.num_steps(T),
            "inpaint": {"samplers": [SamplerKind.DDPM.value, SamplerKind.DDIM.value],
                        "sampler": DEFAULT_SAMPLER.sampler.value, "steps": DEFAULT_SAMPLER.num_steps(T), "jump": 5,
                        "resample": 5},
            "upscaler": up,
            "limits": {"images": self.limits.images, "steps": self.limits.steps, "guidance": self.limits.guidance,
                       "jump": self.limits.jump, "resample": self.limits.resample,
                       "upload_bytes": self.limits.upload_bytes, "upload_side": self.limits.upload_side},
        }

    # -- files ------------------------------------------------------------------------------------
    def path_of(self, ref: str, what: str = "image") -> Path:
        """The file of ``ref`` inside ``out`` (a DataError for anything else, or a file gone)."""
        if not isinstance(ref, str) or not REF.fullmatch(ref):
            raise DataError(f"{what}: {ref!r} is not an image this server has (upload one, or pick a result)")
        path = self.out / ref
        if not path.is_file():
            raise DataError(f"{what}: {ref} is no longer in {self.out_arg}")
        return path

    def shown_path(self, ref: str) -> str:
        """``ref``'s file as the command line names it: under ``--out`` as the server was given it."""
        return str(Path(self.out_arg) / ref)

    def store_upload(self, data: bytes, filename: str, kind: str = "image") -> dict[str, Any]:
        """Check and keep an uploaded image (``kind`` image) or brush mask (``kind`` mask, a PNG);
        its ref, size and notes on how the run will see it. Bad uploads are one-line DataErrors
        naming ``filename``."""
        from PIL import Image, UnidentifiedImageError

        from difflab.data.decode import BadImageError, open_image
        from difflab.io import atomic_write_bytes

        name = " ".join(str(filename or "upload").split())[:120] or "upload"
        if kind not in ("image", "mask"):
            raise ConfigError(f"upload kind must be image or mask, got {kind!r}")
        if not data:
            raise DataError(f"{name}: empty file")
        if len(data) > self.limits.upload_bytes:
            raise DataError(f"{name}: {len(data) / 2**20:.1f} MiB is more than this server takes "
                            f"({self.limits.upload_bytes / 2**20:g} MiB; difflab serve --max-upload-mb)")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise DataError(f"{name}: not an image (PNG, JPEG, WebP, BMP or GIF)") from None
        except Image.DecompressionBombError:
            raise DataError(f"{name}: too many pixels") from None
        if fmt not in UPLOAD_FORMATS or (kind == "mask" and fmt != "PNG"):
            raise DataError(f"{name}: {fmt} files are not taken; upload PNG, JPEG, WebP, BMP or GIF"
                            if kind == "image" else f"{name}: a mask must be a PNG file")
        side = self.limits.upload_side
        if w > side or h > side:
            raise DataError(f"{name}: {w}x{h} pixels is larger than this server takes ({side} pixels a side)")
        folder = "uploads" if kind == "image" else "masks"
        ref = f"{folder}/{hashlib.sha256(data).hexdigest()[:16]}.{UPLOAD_FORMATS[fmt]}"
        path = self.out / ref
        if not path.is_file():
            atomic_write_bytes(path, data)
        try:
            with self._prepare_lock:
                img = open_image(path, 1 if kind == "mask" else self.run.pixel_shape[0])
        except BadImageError as e:
            path.unlink(missing_ok=True)
            raise DataError(f"{name}: {str(e).removeprefix(f'{path}: ')}") from None
        notes = []
        if kind == "image":
            size = self.run.pixel_shape[1]
            if (w, h) != (size, size):
                notes.append(f"{name} is {w}x{h}: the run sees it fitted to {size}x{size} (central square, Lanczos)")
        return {"ref": ref, "url": f"/files/{ref}", "width": img.width, "height": img.height, "format": fmt,
                "name": name, "notes": notes}

    # -- requests ---------------------------------------------------------------------------------
    def prepare(self, data: Any) -> Prepared:
        """Check a request (one-line errors naming the field or flag) and build its job; the
        heavy work runs later, in the queue's worker."""
        form = Form(data)
        task = form.choice("task", "task", list(TASKS), "generate")
        job = Job(task=task, summary="")
        with self._prepare_lock:
            if task == "generate":
                return self._generate(form, job)
            if task == "upscale":
                return self._upscale(form, job)
            return self._edit(form, job, task)

    def _parse(self, argv: list[str], job: Job) -> argparse.Namespace:
        """``argv`` (one difflab command) parsed by difflab's own parser; the job's command is set."""
        from difflab.cli import build_parser

        job.command = shlex.join(["difflab", *argv])
        args = build_parser().parse_args(argv)
        args.no_progress = True
        return args

    def _common(self, form: Form, job: Job, *, sampler: tuple[list[str], str, int]) -> tuple[list[str], int, int]:
        """--sampler/--steps, --seed and -n, and the device: flags every task takes."""
        samplers, default_sampler, default_steps = sampler
        flags = ["--sampler", form.choice("sampler", "Sampler (--sampler)", samplers, default_sampler),
                 "--steps", str(form.integer("steps", "Steps (--steps)", 1, self.limits.steps, default_steps))]
        seed = form.seed()
        n = form.integer("n", "Images (-n)", 1, self.limits.images, 1)
        flags += ["--seed", str(seed), "-n", str(n)]
        if self.device != "auto":
            flags += ["--device", self.device]
        return flags, seed, n

    def _condition(self, form: Form, required: bool) -> tuple[list[str], str]:
        """--class / --label / --prompt and --guidance from the pickers, and a description; with
        ``required`` a caption-trained run needs a prompt (or tags)."""
        cond = self.run.config.cond
        schema = cond.schema
        prompt = form.text("prompt").strip()
        picked = form.text("class").strip()
        labels = form.data.get("labels") or {}
        if not isinstance(labels, dict):
            raise ConfigError("labels must be an object of attribute: value")
        tags = [(str(a), str(v).strip()) for a, v in labels.items() if v is not None and str(v).strip()]
        if len(prompt) > MAX_PROMPT:
            raise ConfigError(f"Prompt (--prompt) is {len(prompt)} characters; at most {MAX_PROMPT}")
        if schema is None and not cond.captions and (prompt or picked or tags):
            raise ConfigError("this run is unconditional (trained without --labels): it takes no class, tags or prompt")
        if prompt and not cond.captions:
            raise ConfigError("Prompt (--prompt): this run was not trained on captions; pick a class or tags")
        if required and cond.captions and not prompt and not tags:
            raise ConfigError("Prompt (--prompt) is empty: type what to generate (this run was trained on captions)")
        if prompt and tags:
            raise ConfigError("give a prompt or tags, not both (the command takes one condition here)")
        flags: list[str] = []
        if prompt:
            flags, what = ["--prompt", prompt], f"prompt {prompt!r}"
        elif picked:
            flags, what = ["--class", picked], f"class {picked}"
        elif tags:
            text = ",".join(f"{a}={v}" for a, v in tags)
            flags, what = ["--label", text], text
        else:
            return [], "unconditional"
        guidance = form.number("guidance", "Guidance (--guidance)", 0.0, self.limits.guidance, 1.0)
        if guidance != 1.0:
            flags += ["--guidance", shown(guidance)]
            what += f", guidance {shown(guidance)}"
        return flags, what

    def _generate(self, form: Form, job: Job) -> Prepared:
        from difflab.cli.sample import plan_sample
        from difflab.samplers import make_grid, sample_batches
        from difflab.visualize.images import save_numbered

        run = self.run
        T = run.schedule.num_timesteps
        cond_flags, what = self._condition(form, required=True)
        flags, seed, n = self._common(form, job, sampler=(sampler_names(), run.config.sampler.sampler.value,
                                                          run.config.sampler.num_steps(T)))
        argv = ["sample", "--run", self.run_arg, *cond_flags, *flags, "--format", "png", "--out", f"repro/{job.id}"]
        args = self._parse(argv, job)
        plan = plan_sample(args, run)
        steps = len(make_grid(run.schedule, plan.cfg))
        job.summary = f"{plan.total} image(s), {what}, {plan.cfg.sampler.value} {steps} steps, seed {seed}"
        folder = self.out / "generate" / job.id

        def work(job: Job) -> None:
            job.set_total(steps * math.ceil(plan.total / args.batch_size))
            job.render_preview = _previews(run, args.precision)
            denoiser = plan.denoiser(run)
            for idx, imgs in sample_batches(denoiser, plan.total, run.image_shape, plan.cfg, seed=args.seed,
                                            batch_size=args.batch_size, start=args.start, device=run.device,
                                            progress=False, callback=job.step, **plan.cond):
                job.check()
                imgs = run.to_pixels(imgs, args.precision)
                save_numbered(imgs, folder, idx.start, "png")  # what `difflab sample --format png` writes
                for k in idx:
                    self._add(job, "generate", k, seed, f"{args.out}/{k + 1}.png")
            self._record(job, folder, seed)

        job.work = work
        return Prepared(job, args)

    def _edit(self, form: Form, job: Job, task: str) -> Prepared:
        from difflab.cli.edit import edit_results, inpaint_results, prepare_inputs
        from difflab.edit.inpaint import DEFAULT_SAMPLER

        run = self.run
        T = run.schedule.num_timesteps
        image = self.path_of(form.text("image"), "Image")
        cond_flags, what = self._condition(form, required=False)
        if task == "edit":
            strength = form.number("strength", "Strength (--strength)", 0.0, 1.0, 0.5)
            sampler = (sampler_names(), run.config.sampler.sampler.value, run.config.sampler.num_steps(T))
            extra = ["--strength", shown(strength)]
            what += f", strength {shown(strength)}"
        else:
            mask = self.path_of(form.text("mask"), "Mask")
            jump = form.integer("jump", "Jump (--jump)", 1, self.limits.jump, 5)
            resample = form.integer("resample", "Resample (--resample)", 1, self.limits.resample, 5)
            sampler = (["ddpm", "ddim"], DEFAULT_SAMPLER.sampler.value, DEFAULT_SAMPLER.num_steps(T))
            extra = ["--mask", self.shown_path(mask.relative_to(self.out).as_posix()), "--jump", str(jump),
                     "--resample", str(resample)]
            what += f", jump {jump}, resample {resample}"
        flags, seed, n = self._common(form, job, sampler=sampler)
        argv = [task, "--run", self.run_arg, "--image", self.shown_path(image.relative_to(self.out).as_posix()), *extra,
                *cond_flags, *flags, "--out", f"repro/{job.id}"]
        args = self._parse(argv, job)
        args.image = str(image)  # the files themselves, whatever the server's working folder
        if task == "inpaint":
            args.mask = str(mask)
        what_cli = "edits" if task == "edit" else "inpaintings"
        inputs, _, rows = prepare_inputs(args, run, what_cli, note=job.notes.append)
        results, _, record = (edit_results if task == "edit" else inpaint_results)(args, run, inputs, rows, callback=job.step)
        per_batch = record["steps_run"] if task == "edit" else record["network_calls_per_image"]
        total = len(inputs.images) * n
        job.summary = f"{total} image(s), {what}, {record['sampler']['sampler']} {args.steps} steps, seed {seed}"
        stem = image.stem
        return self._batches_job(job, args, task, results, per_batch * math.ceil(total / args.batch_size), seed,
                                 lambda k: f"{args.out}/{stem}-{k + 1}.png", _previews(run, args.precision))

    def _upscale(self, form: Form, job: Job) -> Prepared:
        from difflab.cli.common import sampler_config
        from difflab.cli.edit import upscale_inputs, upscale_results
        from difflab.samplers import make_grid

        sr = self.upscaler
        if sr is None:
            raise ConfigError("no upscaler: start the server with --upscaler RUN (a run trained with --task upscale)")
        image = self.path_of(form.text("image"), "Image")
        T = sr.schedule.num_timesteps
        flags, seed, n = self._common(form, job, sampler=(sampler_names(), sr.config.sampler.sampler.value,
                                                          sr.config.sampler.num_steps(T)))
        assert self.upscaler_arg is not None
        argv = ["upscale", "--run", self.upscaler_arg, "--images", self.shown_path(image.relative_to(self.out).as_posix()),
                *flags, "--out", f"repro/{job.id}"]
        args = self._parse(argv, job)
        args.image = str(image)
        inputs = upscale_inputs(args, sr, note=job.notes.append)
        results, _, _ = upscale_results(args, sr, inputs, callback=job.step)
        steps = len(make_grid(sr.schedule, sampler_config(args, sr.config.sampler)))
        job.summary = f"{n} upscaling(s) to {sr.image_shape[1]} px, {args.sampler} {steps} steps, seed {seed}"
        stem = image.stem
        return self._batches_job(job, args, "upscale", results, steps * math.ceil(n / args.batch_size), seed,
                                 lambda k: f"{args.out}/{stem}.png" if n == 1 else f"{args.out}/{stem}-{k + 1}.png")

    def _batches_job(self, job: Job, args: argparse.Namespace, task: str, results: Iterator[tuple[range, Any]],
                     total_steps: int, seed: int, cli_file: Callable[[int], str],
                     previews: Callable[[Any], bytes] | None = None) -> Prepared:
        """The job writing each batch of ``results`` as it comes (k.png, the bytes the command writes);
        ``previews`` renders a step's x0 estimate."""
        from difflab.visualize.images import save_numbered

        folder = self.out / task / job.id

        def work(job: Job) -> None:
            job.set_total(total_steps)
            job.render_preview = previews or preview_png
            for idx, imgs in results:
                job.check()
                save_numbered(imgs, folder, idx.start, "png")
                for k in idx:
                    self._add(job, task, k, seed, cli_file(k))
            self._record(job, folder, seed)

        job.work = work
        return Prepared(job, args)

    def _add(self, job: Job, task: str, k: int, seed: int, cli_file: str) -> None:
        ref = f"{task}/{job.id}/{k + 1}.png"
        job.add_result({"ref": ref, "url": f"/files/{ref}", "index": k + 1, "seed": seed, "cli_file": cli_file,
                        "download": f"difflab-{task}-seed{seed}-{k + 1}.png"})

    def _record(self, job: Job, folder: Path, seed: int) -> None:
        from difflab.io import atomic_write_json

        atomic_write_json(folder / "job.json", {"task": job.task, "command": job.command, "seed": seed,
                                                "summary": job.summary, "notes": job.notes,
                                                "results": [{"file": r["ref"], "command_writes": r["cli_file"]}
                                                            for r in job.results]})


def preview_png(x0: Any) -> bytes:
    """A batch's x0 estimate (B, C, H, W) in [-1, 1] as one PNG grid (at most 8 a row)."""
    from difflab.data.dataset import to_uint8
    from difflab.visualize.images import make_grid, to_pil

    buf = io.BytesIO()
    x0 = x0.detach().float().cpu()
    to_pil(make_grid(to_uint8(x0), nrow=min(len(x0), 8), padding=1)).save(buf, format="PNG")
    return buf.getvalue()


def _previews(run: Any, precision: str) -> Callable[[Any], bytes]:
    """The preview renderer of jobs on ``run``: a latent run's x0 estimates are decoded first."""
    if run.codec is None:
        return preview_png
    return lambda x0: preview_png(run.to_pixels(x0, precision))


def describe_error(e: BaseException) -> str:
    """One line for the page and the log."""
    text = " ".join(str(e).split())
    return text if isinstance(e, DifflabError) else f"internal error: {type(e).__name__}: {text}"
