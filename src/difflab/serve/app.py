"""The HTTP side of ``difflab serve``: a small Starlette app with one hand-written page (``page.html``:
HTML, CSS and JavaScript in one file, nothing fetched from anywhere else) and a JSON API.

| route                             | what                                                            |
| --------------------------------- | --------------------------------------------------------------- |
| ``GET /``                         | the page                                                        |
| ``GET /api/info``                 | the run: size, label vocabulary, samplers, limits, upscaler     |
| ``POST /api/upload?kind=``        | an image (or a brush mask) as the raw body; its ref             |
| ``POST /api/jobs``                | a request (JSON); the job, queued                               |
| ``GET /api/jobs``                 | the queue and the latest jobs                                   |
| ``GET /api/jobs/{id}``            | one job: state, queue position, progress, results, command      |
| ``GET /api/jobs/{id}/preview.png``| the latest x0 estimate of a running job                         |
| ``POST /api/jobs/{id}/cancel``    | cancel (a running job stops at its next step)                   |
| ``GET /files/{ref}``              | a file the server wrote (``?download=NAME`` to save it)         |

Every refused request is a JSON ``{"error": one line}`` with a 4xx status and one log line; an
unexpected exception is a 500 with one line too, never a traceback. POST requests must carry the
header ``X-Difflab: 1`` (a custom header, so another web site's page cannot post to this one
without a CORS preflight, which this app never grants), and with a loopback ``--host`` only requests
addressed to a loopback name are served (no DNS rebinding).
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from difflab.errors import DifflabError
from difflab.serve.jobs import FINISHED, Job, JobQueue, Log, QueueFull, State
from difflab.serve.studio import Studio, describe_error

#: The largest JSON request (a job's fields).
MAX_FORM_BYTES = 64 << 10
#: A body over its limit is read (and dropped) up to this size, so the browser gets the message
#: instead of a reset connection; past it the connection is closed.
MAX_DRAIN_BYTES = 256 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class TooLarge(DifflabError):
    """A request body over its limit (413)."""


class NotFound(DifflabError):
    """An unknown job or file (404)."""


def addressed_to_loopback(host_header: str) -> bool:
    """Whether an HTTP Host header ("127.0.0.1:7860", "localhost", "[::1]:7860") names a loopback address."""
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in LOOPBACK


def page_html() -> str:
    return files("difflab.serve").joinpath("page.html").read_text(encoding="utf-8")


def job_json(job: Job, queue: JobQueue) -> dict[str, Any]:
    return {
        "id": job.id, "task": job.task, "summary": job.summary, "state": job.state.value, "seq": job.seq,
        "finished_seq": job.finished_seq, "position": queue.position(job) if job.state is State.QUEUED else 0,
        "done": job.done, "total": job.total, "preview": f"/api/jobs/{job.id}/preview.png?v={job.preview_version}"
        if job.preview is not None and job.state not in FINISHED else None,
        "results": list(job.results), "command": job.command, "notes": list(job.notes), "error": job.error,
        "seconds": round((job.finished or 0) - job.started, 2) if job.started and job.finished else None,
        "cancel_requested": job.cancel_requested,
    }


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, or TooLarge past ``limit`` bytes (after draining it, up to MAX_DRAIN_BYTES)."""
    size, over = 0, False
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            over = True
            chunks.clear()
            if size > MAX_DRAIN_BYTES:
                break
        else:
            chunks.append(chunk)
    if over:
        raise TooLarge(f"{what}: {size / 2**20:.1f} MiB{' or more' if size > MAX_DRAIN_BYTES else ''} is more than this "
                       f"server takes ({limit / 2**20:g} MiB)")
    return b"".join(chunks)


def create_app(studio: Studio, queue: JobQueue, log: Log, *, host: str = "127.0.0.1") -> Starlette:
    info = studio.info()
    page = page_html()
    loopback_only = host in LOOPBACK  # no DNS rebinding: a name that resolves here must still say it is local

    def handled(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if loopback_only and not addressed_to_loopback(request.headers.get("host", "")):
                    return JSONResponse({"error": "this server answers requests to a loopback address only"}, 400)
                if request.method == "POST" and request.headers.get("x-difflab") != "1":
                    return JSONResponse({"error": "POST requests need the header X-Difflab: 1"}, 403, headers=HEADERS)
                return await fn(request)
            except Exception as e:  # noqa: BLE001 - every failure is one line on the page and in the log
                status = 503 if isinstance(e, QueueFull) else 413 if isinstance(e, TooLarge) else \
                    404 if isinstance(e, NotFound) else 400 if isinstance(e, DifflabError) else 500
                message = describe_error(e)
                log(f"refused {request.method} {request.url.path}: {message}" if status < 500
                    else f"{request.method} {request.url.path} failed: {message}")
                return JSONResponse({"error": message}, status, headers=HEADERS)
        return endpoint

    def find(request: Request) -> Job:
        job = queue.get(request.path_params["job"])
        if job is None:
            raise NotFound(f"no job {request.path_params['job']!r} (finished jobs are listed for a while only)")
        return job

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=HEADERS)

    async def api_info(request: Request) -> Response:
        return JSONResponse(info, headers=HEADERS)

    async def upload(request: Request) -> Response:
        queue.check_room()  # no point keeping an image that no request could use now
        kind = request.query_params.get("kind", "image")
        name = unquote(request.headers.get("x-filename", "upload"))
        data = await read_body(request, studio.limits.upload_bytes, " ".join(name.split())[:120] or "upload")
        result = await run_in_threadpool(studio.store_upload, data, name, kind)
        log(f"{kind} {result['name']!r} ({result['width']}x{result['height']} {result['format']}) kept as {result['ref']}")
        return JSONResponse(result, headers=HEADERS)

    async def submit(request: Request) -> Response:
        queue.check_room()
        body = await read_body(request, MAX_FORM_BYTES, "the request")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DifflabError("the request is not JSON") from None
        prepared = await run_in_threadpool(studio.prepare, data)
        job = prepared.job
        queue.submit(job)
        return JSONResponse(job_json(job, queue), headers=HEADERS)

    async def jobs(request: Request) -> Response:
        listed = queue.jobs()[-30:][::-1]  # newest first
        return JSONResponse({"queue": queue.status(), "jobs": [job_json(j, queue) for j in listed]}, headers=HEADERS)

    async def one_job(request: Request) -> Response:
        return JSONResponse(job_json(find(request), queue), headers=HEADERS)

    async def preview(request: Request) -> Response:
        data = find(request).preview
        if data is None:
            return Response(status_code=404, headers=HEADERS)
        return Response(data, media_type="image/png", headers=HEADERS)

    async def cancel(request: Request) -> Response:
        job = queue.cancel(find(request).id)
        assert job is not None
        if job.state is not State.CANCELLED:
            log(f"job {job.id} ({job.task}) cancel asked for ({job.state.value})")
        return JSONResponse(job_json(job, queue), headers=HEADERS)

    async def file(request: Request) -> Response:
        path = studio.path_of(request.path_params["ref"])
        download = request.query_params.get("download")
        name = "".join(c for c in download if c.isalnum() or c in "-_.")[:100] if download else None
        return FileResponse(path, filename=name or None, content_disposition_type="attachment" if name else "inline",
                            headers={**HEADERS, "Cache-Control": "private, max-age=3600"})

    routes = [
        Route("/", handled(index)),
        Route("/api/info", handled(api_info)),
        Route("/api/upload", handled(upload), methods=["POST"]),
        Route("/api/jobs", handled(jobs)),
        Route("/api/jobs", handled(submit), methods=["POST"]),
        Route("/api/jobs/{job}", handled(one_job)),
        Route("/api/jobs/{job}/preview.png", handled(preview)),
        Route("/api/jobs/{job}/cancel", handled(cancel), methods=["POST"]),
        Route("/files/{ref:path}", handled(file)),
    ]
    return Starlette(routes=routes)
