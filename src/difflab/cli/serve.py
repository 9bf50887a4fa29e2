"""``difflab serve``: a local web page that generates, guides, edits, inpaints and upscales with a run.

One run (and optionally one super-resolution run) is loaded once; requests from the page are queued
and run one at a time (:mod:`difflab.serve`). Needs the ``ui`` extra (Starlette and uvicorn).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from difflab.cli.common import Command, add_device_option, out_folder, positive_int
from difflab.errors import ConfigError


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1024:
        raise argparse.ArgumentTypeError(f"expected a size in MiB, more than 0 and at most 1024, got {text!r}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run to generate with (a run directory made by `difflab train`)")
    p.add_argument("--upscaler", metavar="SR_RUN",
                   help="a super-resolution run (trained with --task upscale) for the Upscale tab")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0 = any free port, printed at start)")
    p.add_argument("--out", help="folder for uploads, masks and results (default RUN/serve); the server writes nowhere else")
    p.add_argument("--max-upload-mb", type=_megabytes, default=8.0, help="largest upload in MiB (default 8)")
    p.add_argument("--queue", type=positive_int, default=8, help="most requests waiting at once (default 8); more are refused")
    add_device_option(p)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} difflab serve: {message}", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before any model is loaded (one line if it cannot be)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({why})") from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from difflab.serve.app import create_app
    except ImportError as e:
        raise ConfigError(f"difflab serve needs the ui extra ({e.name} is missing): pip install 'difflab[ui]'") from None
    from difflab.devices import resolve_device
    from difflab.runs import load_run
    from difflab.serve.jobs import JobQueue
    from difflab.serve.studio import Limits, Studio

    out = out_folder(args.out, "--out") if args.out else Path(args.run).expanduser() / "serve"
    sock = _listen(args.host, args.port)
    try:
        device = resolve_device(args.device)
        run = load_run(args.run, device=device)
        if run.config.upscale.active:
            raise ConfigError(f"--run {args.run} is a super-resolution run: serve a base run and give this one as --upscaler")
        if run.config.segment.active:
            raise ConfigError(f"--run {args.run} is a segmentation run: segment images with difflab segment --run {args.run}")
        upscaler = None
        if args.upscaler:
            upscaler = load_run(args.upscaler, device=device)
            if not upscaler.config.upscale.active:
                raise ConfigError(f"--upscaler {args.upscaler} is not a super-resolution run "
                                  "(train one with --task upscale --from SIZE)")
        studio = Studio(run, args.run, out, upscaler=upscaler, upscaler_arg=args.upscaler, device=args.device,
                        limits=Limits(upload_bytes=int(args.max_upload_mb * 2**20)))
        queue = JobQueue(max_waiting=args.queue, log=_log)
        app = create_app(studio, queue, _log, host=args.host)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        try:
            with _sigterm_raises():  # before the address is printed: whoever reads it may stop the server at once
                print(f"difflab serve: {args.run} (step {run.step}) at {url} ; writing into {out} ; Ctrl-C stops",
                      flush=True)
                if args.host not in ("127.0.0.1", "localhost", "::1"):
                    _log(f"warning: --host {args.host} lets other machines use this server (no login)")
                server.run(sockets=[sock])  # until Ctrl-C or SIGTERM (uvicorn re-raises the signal once it has stopped)
        except _Terminated:
            pass  # a clean stop: the queue is closed and the line below printed
        finally:
            queue.close()
            print("difflab serve: stopped", flush=True)
    finally:
        sock.close()
    return 0


class _Terminated(Exception):
    """SIGTERM arrived (uvicorn stops first, then re-raises the signal for the previous handler: this one)."""


@contextlib.contextmanager
def _sigterm_raises():
    """While active, SIGTERM raises :class:`_Terminated` instead of killing the process at once, so the
    server's ``finally`` still runs (the queue closed, "stopped" printed); the old handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


COMMANDS: dict[str, Command] = {
    "serve": ("a local web page: generate, guide, edit, inpaint and upscale with a run (needs difflab[ui])",
              add_serve_arguments, run_serve),
}
