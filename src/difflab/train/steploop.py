"""The step loop the single-process trainers share (the GAN trainer, the autoencoder trainer): train
until ``max_steps``, the minutes budget, ``stop_at`` (tests) or a signal; log, preview and checkpoint on
their schedules; check for NaN before anything is logged, previewed or saved; save at the end.

A trainer mixes in :class:`StepLoop` and supplies ``cfg.train`` (``max_steps``, ``minutes``, ``seed``,
``batch_size``, ``log_every``, ``sample_every``, ``checkpoint_every``), the counters ``step``,
``images_seen``, ``elapsed`` and ``first_bad`` (a tensor: the first step whose loss was not finite, 0 if
none, kept on the device so the loop never waits for it), ``ema``, ``device``, ``progress``, ``run_dir``,
and the hooks below. (The diffusion trainer, :mod:`difflab.train.loop`, has its own loop: it also runs
under DDP, where every rank must agree when to stop.)
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.precision import fast_matmul
from difflab.train.checkpoint import latest_checkpoint
from difflab.train.loop import stop_requests


class StepLoop(ABC):
    """Base of a trainer: :meth:`run_loop` and the message about the last good checkpoint; the trainer
    implements the abstract hooks (instantiating one that misses a hook fails at once)."""

    #: how many running sums the log keeps (the trainer's own indices into them)
    log_sums: int
    cfg: Any
    step: int
    images_seen: int
    elapsed: float
    first_bad: torch.Tensor
    ema: Any
    device: torch.device
    progress: bool
    run_dir: Any

    # -- hooks ------------------------------------------------------------------------------------------------
    @abstractmethod
    def loop_description(self) -> str:
        """The progress bar's label."""

    @abstractmethod
    def train_modules(self) -> list[torch.nn.Module]:
        """The modules put in training mode for the loop."""

    @abstractmethod
    def ema_source(self) -> torch.nn.Module:
        """The module the EMA follows."""

    @abstractmethod
    def train_step(self, sums: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the next batch, adding to ``sums``; a bool tensor: all its losses finite."""

    @abstractmethod
    def log_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a log record."""

    def after_log(self, record: dict[str, Any]) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """Called with each log record (e.g. a collapse check that may raise)."""

    @abstractmethod
    def check_finite(self) -> None:
        """Raise TrainingDiverged naming ``first_bad``, the first step whose loss was not finite, if any."""

    @abstractmethod
    def write_log(self, sums: torch.Tensor, images_per_s: float) -> dict[str, Any]:
        """Append one record made from the running sums to the run's log; return it."""

    @abstractmethod
    def save_samples(self) -> None:
        """Write the preview grid."""

    @abstractmethod
    def save(self) -> None:
        """Write a checkpoint atomically."""

    # -- the loop ---------------------------------------------------------------------------------------------
    def last_good(self) -> str:
        ckpt = latest_checkpoint(self.run_dir)
        return (f"the last checkpoint (step {ckpt.state['step']}) in {self.run_dir} is intact" if ckpt is not None
                else f"no checkpoint was saved yet in {self.run_dir}")

    def run_loop(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train, save, return {step, stopped_by, steps_this_run, seconds, train_seconds, images_per_s, run_dir}."""
        tc = self.cfg.train
        end = min(tc.max_steps, stop_at or tc.max_steps)
        start_time, start_step = time.monotonic(), self.step
        sums = torch.zeros(self.log_sums, device=self.device)
        last_log_time, last_log_step = start_time, self.step
        reason = "max_steps"
        timed = bool(tc.minutes)
        bar = tqdm(total=round(tc.minutes * 60) if timed else tc.max_steps, initial=0 if timed else self.step,
                   desc=self.loop_description(), unit="s" if timed else "step", disable=not self.progress,
                   dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]" if timed else None)
        train_seconds = 0.0
        try:
            with stop_requests() as stop, fast_matmul(self.device), torch.random.fork_rng(devices=[]):
                torch.manual_seed(tc.seed)  # (nothing draws from torch's global stream: every draw is per example)
                for module in self.train_modules():
                    module.train()
                while self.step < end:
                    finite = self.train_step(sums)
                    self.step += 1
                    self.images_seen += tc.batch_size
                    self.ema.update(self.ema_source(), self.images_seen, tc.batch_size)
                    sums[-1] += 1  # the last running sum counts the steps
                    self.first_bad = torch.where(finite | (self.first_bad > 0), self.first_bad,
                                                 torch.full_like(self.first_bad, self.step))
                    out_of_time = timed and time.monotonic() - start_time >= tc.minutes * 60
                    stopping = "minutes" if out_of_time else stop["signal"] or ("max_steps" if self.step >= end else None)
                    log_now = self.step % tc.log_every == 0 or stopping is not None
                    sample_now = bool(tc.sample_every) and self.step % tc.sample_every == 0
                    save_now = self.step % tc.checkpoint_every == 0
                    if log_now or sample_now or save_now:  # before anything is logged, previewed or saved
                        self.check_finite()
                    bar.update(min(time.monotonic() - start_time, tc.minutes * 60) - bar.n if timed else 1)
                    if log_now:
                        now = time.monotonic()
                        rate = (self.step - last_log_step) * tc.batch_size / max(now - last_log_time, 1e-9)
                        record = self.write_log(sums, rate)
                        bar.set_postfix(step=self.step, **self.log_postfix(record), img_s=f"{rate:.0f}")
                        sums.zero_()
                        last_log_time, last_log_step = now, self.step
                        self.after_log(record)
                    if sample_now:
                        self.save_samples()
                    if save_now and stopping is None:
                        self.save()
                    if stopping is not None:
                        reason = stopping
                        break
                train_seconds = time.monotonic() - start_time
                self.elapsed += train_seconds
                self.save()
                if tc.sample_every and self.step % tc.sample_every:
                    self.save_samples()
        finally:
            bar.close()
        steps = self.step - start_step
        return {"step": self.step, "stopped_by": reason, "steps_this_run": steps,
                "seconds": time.monotonic() - start_time, "train_seconds": train_seconds,
                "images_per_s": steps * tc.batch_size / max(train_seconds, 1e-9), "run_dir": str(self.run_dir)}
