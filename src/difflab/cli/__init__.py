"""The ``difflab`` command line: one module per command family, gathered here.

| module                    | commands                                          |
| ------------------------- | ------------------------------------------------- |
| :mod:`.train`             | ``train``, ``demo``                               |
| :mod:`.sample`            | ``sample``                                        |
| :mod:`.edit`              | ``edit`` (SDEdit), ``inpaint`` (RePaint)          |
| :mod:`.evaluate`          | ``eval``, ``fid-stats``, ``eval-seg`` (segmentation) |
| :mod:`.visualize`         | ``noise``, ``progress``, ``animate``, ``curves``, ``compare`` |
| :mod:`.serve`             | ``serve`` (the local web page, :mod:`difflab.serve`) |
| :mod:`.interop`           | ``import`` (diffusers, denoising-diffusion-pytorch), ``export`` (diffusers) |
| :mod:`.autoencoder`       | ``train-autoencoder`` (the KL autoencoder of latent diffusion) |
| :mod:`.segment`           | ``segment`` (masks of images from a segmentation run: samples, vote, uncertainty) |
| :mod:`.common`            | the parser, argument types, run and sampler options, output checks |

Every user mistake (bad flag, missing path, incompatible options, damaged file) is reported as one
line, ``difflab: error: ...``, with exit status 2; tracebacks are for bugs only. difflab's own
warnings print as ``difflab: warning: ...``; other libraries' warnings keep Python's own format.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

from difflab.cli import autoencoder, edit, evaluate, gan, interop, sample, segment, serve, train, visualize
from difflab.cli.common import EXIT_USAGE, Command, Parser
from difflab.errors import DifflabError, DifflabWarning

__all__ = ["EXIT_USAGE", "build_parser", "commands", "main"]


def commands() -> dict[str, Command]:
    return {**train.COMMANDS, **sample.COMMANDS, **edit.COMMANDS, **evaluate.COMMANDS, **visualize.COMMANDS,
            **gan.COMMANDS, **serve.COMMANDS, **interop.COMMANDS, **autoencoder.COMMANDS, **segment.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    from difflab import __version__

    parser = Parser(prog="difflab", description="Train, sample, evaluate and visualise image diffusion models.")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (help_, add, _) in commands().items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def _show_warning(default: Any) -> Any:
    """A ``warnings.showwarning`` that prints difflab's warnings as one line and leaves others to ``default``."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if issubclass(category, DifflabWarning):
            print(f"difflab: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else map(str, argv))  # `train --procs N` runs it again
        # argparse matches a positional list once: key=value overrides after another option land here
        spill = [a for a in extra if "=" in a and not a.startswith("-")]
        if spill and isinstance(getattr(args, "overrides", None), list) and len(spill) == len(extra):
            args.overrides += spill
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        with warnings.catch_warnings():  # restores the warning machinery on the way out
            warnings.showwarning = _show_warning(warnings.showwarning)
            return commands()[args.command][2](args)
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
