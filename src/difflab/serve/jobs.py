"""The queue of ``difflab serve``: one worker thread runs one job at a time, in submission order.

A :class:`Job` is the work of one request (a closure over a loaded run) plus what the page shows of it:
its state, place in the queue, progress, the latest preview of the x0 estimate (PNG bytes) and its
results. Jobs wait in a bounded queue (:class:`QueueFull` past ``max_waiting``); ``cancel`` drops a
waiting job at once and stops a running one at its next sampler step (:meth:`Job.step` raises
:class:`Cancelled` from the sampler's callback). A job that fails (a :class:`~difflab.errors.DifflabError`
is the user's; anything else is reported as an internal error) leaves the worker serving the next one.
Nothing here knows about HTTP or models.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from difflab.errors import DifflabError

Log = Callable[[str], None]


class State(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (State.DONE, State.FAILED, State.CANCELLED)


class QueueFull(DifflabError):
    """The queue holds ``max_waiting`` jobs already."""


class Cancelled(Exception):
    """Raised inside a running job (from its step callback) once cancelling was asked for."""


@dataclass
class Job:
    """One request: ``work(job)`` does it in the worker thread, reporting through :meth:`step`,
    :meth:`set_total` and :meth:`add_result`; the rest is what the page shows."""

    task: str
    summary: str = ""
    work: Callable[[Job], None] | None = None
    command: str = ""
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: State = State.QUEUED
    seq: int = 0  # submission number
    finished_seq: int = 0  # 1, 2, ... in the order jobs finish (0: not finished)
    done: int = 0  # sampler steps made
    total: int = 0  # sampler steps in all
    preview: bytes | None = None  # PNG of the latest x0 estimate
    preview_version: int = 0
    preview_every: int = 1
    render_preview: Callable[[Any], bytes] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False

    def set_total(self, steps: int, previews: int = 12) -> None:
        """Announce ``steps`` sampler steps in all; a preview is rendered about ``previews`` times."""
        self.total = max(int(steps), 0)
        self.preview_every = max(1, self.total // max(previews, 1))

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancelling was asked for."""
        if self.cancel_requested:
            raise Cancelled

    def step(self, s: Any) -> None:
        """The sampler callback: one step made (``s`` is a :class:`difflab.samplers.base.Step`)."""
        self.check()
        self.done += 1
        if self.render_preview is not None and (self.done % self.preview_every == 0 or self.done == 1):
            self.preview = self.render_preview(s.x0)
            self.preview_version += 1

    def add_result(self, result: dict[str, Any]) -> None:
        self.results.append(result)


class JobQueue:
    """Jobs run one at a time by one daemon thread; ``keep`` finished jobs stay listed."""

    def __init__(self, max_waiting: int = 8, log: Log = print, keep: int = 100) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {max_waiting}")
        self.max_waiting, self.log, self.keep = max_waiting, log, keep
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # every listed job, in submission order
        self._running: Job | None = None
        self._seq = self._finished = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="difflab-serve-worker", daemon=True)
        self._thread.start()

    # -- what the handlers call -----------------------------------------------------------------
    def check_room(self) -> None:
        """QueueFull when a new job could not be queued now (checked before an upload or a job is prepared)."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting, at most {self.max_waiting}); "
                                "try again when one has finished")

    def submit(self, job: Job) -> int:
        """Queue ``job``; its place in the queue (1 = next to run)."""
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if job.work is None:
                raise ValueError(f"job {job.id} has no work")
            self.check_room()
            self._seq += 1
            job.seq = self._seq
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self.log(f"job {job.id} ({job.task}) queued at position {len(self._waiting)}: {job.command or job.summary}")
            self._lock.notify_all()
            return len(self._waiting)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def position(self, job: Job) -> int:
        """1, 2, ... for a waiting job (1 = next), 0 otherwise."""
        with self._lock:
            for k, waiting in enumerate(self._waiting, 1):
                if waiting is job:
                    return k
            return 0

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self._running.id if self._running else None, "waiting": [j.id for j in self._waiting],
                    "max_waiting": self.max_waiting}

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a waiting job now, or ask a running one to stop at its next step; None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return job
            job.cancel_requested = True
            if job.state is State.QUEUED:
                self._waiting.remove(job)
                self._finish(job, State.CANCELLED)
                self.log(f"job {job.id} ({job.task}) cancelled while waiting")
            return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker (waits up to ``timeout`` s for a running job's next step)."""
        with self._lock:
            self._closed = True
            for job in list(self._waiting):
                job.cancel_requested = True
                self._finish(job, State.CANCELLED)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel_requested = True
            self._lock.notify_all()
        self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job waits or runs (True), or ``timeout`` s pass (False)."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._waiting or self._running is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    # -- the worker ----------------------------------------------------------------------------------
    def _finish(self, job: Job, state: State, error: str | None = None) -> None:  # with the lock held
        self._finished += 1
        job.state, job.error, job.finished, job.finished_seq = state, error, time.time(), self._finished
        job.preview, job.render_preview = None, None  # the results replace it

    def _forget_old(self) -> None:  # with the lock held: drop the oldest finished jobs past `keep`
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                job.state, job.started, self._running = State.RUNNING, time.time(), job
            self.log(f"job {job.id} ({job.task}) started: {job.summary}")
            state, error = State.DONE, None
            try:
                assert job.work is not None  # submit() refuses a job without work
                job.work(job)
            except Cancelled:
                state = State.CANCELLED
            except DifflabError as e:
                state, error = State.FAILED, str(e)
            except Exception as e:  # noqa: BLE001 - a model or sampler error must not stop the server
                state, error = State.FAILED, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
            with self._lock:
                self._finish(job, state, error)
                self._running = None
                self._lock.notify_all()
            seconds = (job.finished or 0) - (job.started or 0)
            if state is State.DONE:
                self.log(f"job {job.id} ({job.task}) done in {seconds:.1f} s: {len(job.results)} image(s)")
            elif state is State.CANCELLED:
                self.log(f"job {job.id} ({job.task}) cancelled after {job.done} of {job.total} steps")
            else:
                self.log(f"job {job.id} ({job.task}) failed: {error}")
