"""What every command shares: the parser that turns argparse's errors into one line, argument types,
the options that load a run and pick a sampler, and checks of output paths made before any work.

A command module defines ``COMMANDS: {name: (help, add_arguments(parser), run(args) -> exit code)}``;
:mod:`difflab.cli` gathers them. Bad input raises :class:`difflab.errors.DifflabError` subclasses,
printed as ``difflab: error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from difflab.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command runs
    from difflab.samplers import SamplerConfig

EXIT_USAGE = 2

# a command: (one-line help, add_arguments(parser), run(args) -> exit code)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's usage dump -> our one line
        command = self.prog.split()[-1]  # the subcommand; the top-level parser is 'difflab' itself
        raise ConfigError(message if command == "difflab" else f"{command}: {message}")


def choices(enum_cls: type[Enum]) -> list[str]:
    """The values of an option Enum, for argparse's ``choices``."""
    return [str(m.value) for m in enum_cls]


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


# -- output paths, checked before any work ------------------------------------------------------
def out_file(path: str | Path, flag: str, suffixes: Sequence[str]) -> Path:
    """A file to write: not an existing folder, and ending in one of ``suffixes``."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {out}: must end in {' or '.join(suffixes)}")
    return out


def out_folder(path: str | Path, flag: str) -> Path:
    """A folder to write into: it may exist, but not as a file."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a folder")
    return out


def check_outputs(args: argparse.Namespace) -> Path | None:
    """Check ``--out`` (a folder, if given) and ``--grid`` (an image file name) before any work; the grid path."""
    if args.out:
        out_folder(args.out, "--out")
    return out_file(args.grid, "--grid", (".png", ".jpg", ".jpeg")) if args.grid else None


# -- loading a run ----------------------------------------------------------------------------------
def add_run_options(p: argparse.ArgumentParser, *, compile: bool = False) -> None:
    """--run, --weights, --clip, --precision (and --compile), --seed: how a trained run samples."""
    from difflab.denoiser import Clip
    from difflab.precision import Precision
    from difflab.runs import Weights

    p.add_argument("--run", required=True, help="a run directory made by `difflab train`")
    p.add_argument("--weights", default=Weights.EMA.value, choices=choices(Weights), help="EMA (default) or raw weights")
    p.add_argument("--clip", default=None, choices=choices(Clip),
                   help="x0_hat clipping to the data range [-1, 1] at each step (default clip, none for a latent run; "
                        "dynamic = Imagen thresholding)")
    p.add_argument("--precision", default=Precision.AUTO.value, choices=choices(Precision),
                   help="network precision: auto = bf16 autocast where the CPU/GPU does bf16 natively (default)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the network (needs a C++ compiler; pays for large sample sets once compiled)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed (seed, k): same seed, same images")
    add_device_option(p)


def add_format_options(p: argparse.ArgumentParser) -> None:
    """``--format`` and ``--jpeg-quality`` of a numbered image folder (``difflab sample``, ``difflab gan sample``)."""
    from difflab.visualize.images import JPEG_QUALITY, ImageFormat

    p.add_argument("--format", default=ImageFormat.JPG.value, choices=choices(ImageFormat), help="image format (default jpg)")
    p.add_argument("--jpeg-quality", type=jpeg_quality, default=JPEG_QUALITY, metavar="Q",
                   help=f"JPEG quality 1-100, 4:2:0 chroma (default {JPEG_QUALITY}: FID moves by ~10 between 95 and 100 "
                        "on 64 px faces; compare folders written alike)")


def format_fields(args: argparse.Namespace) -> dict[str, Any]:
    """What a sampling record says of the files: ``format`` and, for JPEGs, ``jpeg_quality``."""
    return {"format": args.format, "jpeg_quality": args.jpeg_quality if args.format == "jpg" else None}


def jpeg_quality(text: str) -> int:
    value = _int_at_least(text, 1, "JPEG quality")
    if value > 100:
        raise argparse.ArgumentTypeError(f"{value} is above 100 (JPEG quality is 1 ... 100)")
    return value


def add_device_option(p: argparse.ArgumentParser) -> None:
    from difflab.devices import DEVICE_HELP

    p.add_argument("--device", default="auto", help=DEVICE_HELP + "; a seed gives the same noise on every device")


def load_run_for(args: argparse.Namespace, run: str | None = None, *, latent: bool = False, segment: bool = False) -> Any:
    """``--run`` (or ``run``) loaded with ``--weights`` on ``--device``; ``--clip`` left out becomes the
    run's default. A latent run (:mod:`difflab.latent`) is one line unless the command takes one (``latent``);
    so is a segmentation run (:mod:`difflab.edit.segment`) unless the command is ``segment``."""
    from difflab.devices import resolve_device
    from difflab.runs import load_run

    loaded = load_run(run or args.run, weights=args.weights, device=resolve_device(args.device))
    if loaded.config.segment.active and not segment:
        name = run or args.run
        raise ConfigError(f"--run {name} is a segmentation run ({loaded.config.segment.num_classes} classes): its samples "
                          f"are masks of images; use difflab segment --run {name} --images DIR --out DIR")
    if loaded.codec is not None and not latent:
        raise ConfigError(f"--run {run or args.run} is a latent run (diffusion on an autoencoder's latents): difflab "
                          f"{getattr(args, 'command', None) or 'this command'} works on pixel-space runs; "
                          "difflab sample, edit, inpaint, compare, progress and animate take it")
    if hasattr(args, "clip"):
        args.clip = loaded.clip_mode(args.clip).value
    return loaded


# -- what to generate ---------------------------------------------------------------------------------
def add_condition_options(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """--class, --label, --prompt (what to generate; -n images of each) and --guidance (with ``sweep``,
    a comma list of weights, e.g. 0,1,2,4)."""
    p.add_argument("--class", dest="classes", metavar="NAME[,NAME...]|all",
                   help="class-conditional runs: the class(es) to generate (names or indices; all = every class), "
                        "-n images each, one grid row each")
    p.add_argument("--label", action="append", default=[], metavar="ATTR=VALUE,...",
                   help="attribute runs: e.g. hair=blue,eyes=red (attributes left out are not conditioned on); "
                        "repeat for several, -n images each")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="caption-trained runs: any sentence, e.g. 'a girl with blue hair and red eyes'; repeat for several")
    if sweep:
        p.add_argument("--guidance", type=_weights, default=(1.0,), metavar="W[,W...]",
                       help="classifier-free guidance weights to compare, e.g. 0,1,2,4 (default 1)")
    else:
        p.add_argument("--guidance", type=nonneg_float, default=1.0,
                       help="classifier-free guidance weight w: 0 unconditional, 1 conditional (default), >1 stronger")
    p.add_argument("--guidance-interval", metavar="LO,HI", type=_interval,
                   help="apply guidance only for noise levels sigma in [LO, HI] (e.g. 0.3,5); plain conditional elsewhere")


def _weights(text: str) -> tuple[float, ...]:
    weights = tuple(nonneg_float(v.strip()) for v in text.split(","))
    if len(set(weights)) != len(weights):
        raise argparse.ArgumentTypeError(f"--guidance lists a weight twice: {text!r}")
    return weights


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {text!r}")
    return lo, hi


# -- picking a sampler ----------------------------------------------------------------------------
# SamplerConfig fields that a flag of the same name sets (None = flag not given)
_SAMPLER_FLAGS = ("steps", "eta", "churn", "spacing", "variance", "trailing")


#: ``--sampler``'s default in the help of commands that sample a trained run
RUN_SAMPLER = ("the run's [sampler] table (ddim eta 1 at 50 steps, 20 for a latent run, unless its recipe or config "
               "names another)")


def add_sampler_options(p: argparse.ArgumentParser, *, default: str) -> None:
    """The sampler flags of ``sample``, ``progress`` and ``animate``; read them with
    :func:`sampler_config`. Every flag defaults to "not given", so the base config (a run's [sampler]
    table, or the command's own default, ``default``) decides what is not asked for."""
    from difflab.samplers import GridKind, SamplerKind, Spacing
    from difflab.schedule import VarianceType

    p.add_argument("--sampler", choices=choices(SamplerKind), help=f"default: {default}")
    p.add_argument("--steps", type=positive_int,
                   help="sampling steps (default: ddpm every training step, others 50); heun costs 2N-1 network calls, others N")
    p.add_argument("--grid-kind", choices=choices(GridKind),
                   help="step grid (default: uniform for ddpm/ddim, karras for euler/heun, log-snr for dpmpp-*)")
    p.add_argument("--trailing", action=argparse.BooleanOptionalAction, default=None,
                   help="leave out the network call at t = 0: the grid of STEPS + 1 points minus its last (Lin et al. 2024)")
    p.add_argument("--eta", type=float, help="ddim noise: 0 deterministic (default), 1 = DDPM's ancestral sampler")
    p.add_argument("--churn", type=nonneg_float, help="euler/heun: Karras et al.'s S_churn noise (default 0)")
    p.add_argument("--spacing", choices=choices(Spacing), help="older name for --grid-kind uniform|quadratic")
    p.add_argument("--variance", choices=choices(VarianceType), help="ddpm: reverse variance (default fixed-small)")


def sampler_config(args: argparse.Namespace, base: SamplerConfig) -> SamplerConfig:
    """The SamplerConfig the flags ask for, on top of ``base``: with no --sampler (or the base's own),
    the flags change only what they name; another --sampler starts from that sampler's defaults
    (:meth:`SamplerConfig.default_for`), so options of the base's sampler do not leak into it."""
    from difflab.samplers import SamplerConfig

    given = {name: getattr(args, name) for name in _SAMPLER_FLAGS if getattr(args, name) is not None}
    if args.grid_kind is not None:
        given["grid"] = args.grid_kind
    if args.sampler is not None and args.sampler != base.sampler.value:
        return SamplerConfig.default_for(args.sampler, **given)
    return dataclasses.replace(base, **given)


def sampler_name(cfg: SamplerConfig, num_timesteps: int) -> str:
    """A folder name for a sample set: kind-steps[-grid][-trailing][-etaX]."""
    name = f"{cfg.sampler.value}-{cfg.num_steps(num_timesteps)}"
    if cfg.grid is not None:
        name += f"-{cfg.grid.value}"
    if cfg.eta:
        name += f"-eta{cfg.eta:g}"
    return name + ("-trailing" if cfg.trailing else "")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_path(a: Any, b: Any) -> bool:
    """Two data paths name the same file or folder (``../data`` and ``/work/data``, say)."""
    if a == b:
        return True
    try:
        return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(a).samefile(b)
    except OSError:
        return False


C = TypeVar("C")


def resume_config(saved: C, flags: dict[str, Any], overrides: Sequence[str], *, toml: dict | None = None,
                  named: Sequence[tuple[str, Any, Any]] = ()) -> C:
    """The saved run config (any config dataclass) with this command line's training options applied,
    for ``--resume``. The command may repeat the options the run was started with (a requeued job runs
    the same line again); only a real change outside ``train.*`` is refused, in one line naming each
    option with its saved and new value. ``flags`` are dotted keys given by flags, ``named`` are
    (flag, given value or None, saved value) of choices such as --preset that are not config fields."""
    from difflab.config import apply_overrides, to_dict

    conflicts = [f"{flag} {new} (saved: {old})" for flag, new, old in named if new and new != old]
    before = _flatten(to_dict(saved))
    flags = dict(flags)
    for key in ("data.source", "data.labels"):  # the same folder named another way is no change
        if key in flags and key in before and _same_path(flags[key], before[key]):
            flags[key] = before[key]
    items: list[tuple[str, Any]] = [*flags.items(), *_flatten(toml or {}).items()]
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep:
            apply_overrides(saved, [text])  # its one-line error about the form key=value
        items.append((key.strip(), value.strip()))
    cfg = saved
    for key, value in items:
        if key.startswith("train.") or key not in before:  # a training option, or an unknown key's own error
            cfg = apply_overrides(cfg, {key: value})
            continue
        try:
            new = _flatten(to_dict(apply_overrides(saved, {key: value})))[key]
        except ConfigError:  # a value the saved run cannot take (another image size than its network's...)
            new = value
        if new != before[key]:
            conflicts.append(f"{key}={new!r} (saved: {before[key]!r})")
    if conflicts:
        raise ConfigError("--resume continues the saved config; only train.* options may change, not: " + ", ".join(conflicts))
    return cfg


def add_training_controls(p: argparse.ArgumentParser, overrides_example: str) -> None:
    """The options every training command ends with: --resume [auto], --dry-run, --device, --no-progress
    and the ``key=value`` overrides (``overrides_example`` shows some)."""
    p.add_argument("--resume", nargs="?", const="always", action=ResumeAction, metavar="auto",
                   help="continue the run in --out from its newest checkpoint (flags equal to the saved config are "
                        "fine; only training options may change); --resume auto: resume if --out has a checkpoint, "
                        "else start the run, so one command line serves the first start and every requeue")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides with dotted keys, e.g. {overrides_example}")


class ResumeAction(argparse.Action):
    """``--resume`` (always) or ``--resume auto``. An optional value swallows the next word, so a
    ``key=value`` override right after ``--resume`` is handed back to the overrides."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values is None or values in ("always", "auto"):
            setattr(namespace, self.dest, values or "always")
        elif "=" in values:
            setattr(namespace, self.dest, "always")
            namespace.resume_spill = [*getattr(namespace, "resume_spill", []), values]
        else:
            parser.error(f"--resume takes no value or 'auto', not {values!r}")


def with_spilled_overrides(args: argparse.Namespace) -> list[str]:
    """The command's ``key=value`` overrides, with the one ``--resume`` swallowed first."""
    return [*getattr(args, "resume_spill", []), *args.overrides]


def is_resuming(args: argparse.Namespace) -> bool:
    """``--resume``, or ``--resume auto`` on a run directory that has a checkpoint."""
    from difflab.train.checkpoint import has_checkpoint

    return args.resume == "always" or (args.resume == "auto" and has_checkpoint(args.out))


def run_in_procs(procs: int, argv: Sequence[str]) -> int:
    """Run this command line again as ``procs`` data-parallel processes on this machine, without
    ``--procs``: ranks 0 ... procs-1 with the environment ``torchrun`` gives (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT on a free local port), each with cores / procs torch threads unless
    ``OMP_NUM_THREADS`` is set. The ranks run in their own session, so a signal reaches them once,
    through here: SIGINT or SIGTERM is passed to every rank (they agree to stop at one step and rank 0
    saves); if a rank fails, the others are stopped the same way. Returns the worst exit status."""
    import signal
    import socket
    import subprocess
    import time

    rest, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--procs":
            skip = True
        elif not word.startswith("--procs="):
            rest.append(word)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // procs))
    with socket.socket() as sock:  # a free port for the rendezvous (rank 0 binds it again at once)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    print(f"difflab: {procs} processes of {threads} thread(s) (as torchrun --standalone --nproc_per_node {procs} "
          f"-m difflab {' '.join(rest)})", file=sys.stderr, flush=True)
    base = {**os.environ, "OMP_NUM_THREADS": threads, "WORLD_SIZE": str(procs), "LOCAL_WORLD_SIZE": str(procs),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-m", "difflab", *rest], start_new_session=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(procs)]
    sent: set[int] = set()

    def stop(signum: int) -> None:
        if signum not in sent:  # once per signal kind: a second SIGINT/SIGTERM would make the ranks quit unsaved
            sent.add(signum)
            for rank in ranks:
                if rank.poll() is None:
                    rank.send_signal(signum)

    old = {s: signal.signal(s, lambda signum, _frame: stop(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(rank.poll() is None for rank in ranks):
            if any(rank.returncode not in (None, 0) for rank in ranks):
                stop(signal.SIGTERM)  # a failed rank: the others would wait for it in the next collective
            time.sleep(0.2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return max(rank.returncode for rank in ranks)


def train_and_report(trainer_cls: Callable[..., Any], cfg: Any, args: argparse.Namespace, resuming: bool) -> int:
    """What ``train`` and ``gan train`` do once the config is resolved: print it (--dry-run) or build the
    trainer, keep a resumed run's changed training options in its config.json, train, report."""
    from difflab.io import atomic_write_bytes
    from difflab.train.checkpoint import CONFIG

    if args.dry_run:
        print(cfg.to_json(), end="")
        return 0
    trainer = trainer_cls(cfg, args.out, resume=True if resuming else "auto" if args.resume == "auto" else False,
                          progress=not args.no_progress, device=args.device)
    if resuming:  # keep the changed training options with the run, so the next resume sees them
        atomic_write_bytes(Path(args.out) / CONFIG, cfg.to_json().encode())
    result = trainer.run()
    print(f"trained to step {result['step']} ({result['stopped_by']}) in {result['seconds']:.0f} s; run: {result['run_dir']}")
    return 0
