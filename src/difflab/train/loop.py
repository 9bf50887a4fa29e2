"""The training loop: AdamW, warm-up and optional cosine decay, gradient clipping and
accumulation, EMA, bf16 autocast, periodic sample grids and checkpoints, exact resume, and DDP.

Distributed training: launched by ``torchrun``, each process reads RANK / WORLD_SIZE / LOCAL_RANK
from the environment (a plain ``python`` run is rank 0 of 1). ``train.batch_size`` is the global
number of images per optimizer step; each rank processes batch_size / (world_size * grad_accum) at a
time, from its own stride of a shared per-epoch permutation, so hyper-parameters mean the same on
one CPU and on many GPUs. Only rank 0 writes files.

Reproducibility: the batch order is a per-epoch permutation seeded by the config; every other random
choice about an example (augmentation, timestep, noise, condition dropout) comes from that example's
own generator, seeded by the run's seed and the example's place in the job's stream of examples, so
it does not depend on the world size or the micro-batch the example lands in (N ranks with global
batch B train like one process with batch B, up to floating-point reduction order). The global
torch RNG (used by dropout) is forked for the duration of training and seeded from the config; its
per-rank states, the data position, optimizer and EMA are in every checkpoint, so a resumed run is
bit-identical to an uninterrupted one on the same machine.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from difflab.config import LRDecay, RunConfig, SegObjective, TrainConfig
from difflab.data.augment import augment
from difflab.data.dataset import ImageData, load_dataset, to_float, to_uint8
from difflab.data.paired import PairAugment, PairedData, colorize, joint_augment, load_pairs, split_pairs
from difflab.denoiser import Denoiser
from difflab.devices import resolve_device, to_device
from difflab.edit.segment import ce_logits, ce_loss, onehot, segment_batches, to_mask
from difflab.edit.upscale import measure_scale, resize, training_pair, upscale_batches
from difflab.errors import CheckpointError, ConfigError, DifflabError, DifflabWarning, OutputError
from difflab.io import atomic_write_bytes
from difflab.latent import LatentCodec, codec_from_run, encode_images, freeze, load_codec
from difflab.models.unet import UNet
from difflab.precision import autocast_dtype, fast_matmul, require_compiler, to_memory_format
from difflab.samplers import SamplerConfig, SamplerKind, image_generators, sample
from difflab.samplers.noise import randn
from difflab.schedule import NoiseSchedule
from difflab.train.checkpoint import (
    CONFIG,
    LATEST,
    Checkpoint,
    load_newest_good,
    load_weights,
    open_run_dir,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    start_run_dir,
)
from difflab.train.conditions import TrainingConditions
from difflab.train.ema import EMA
from difflab.train.tensorboard import TensorBoardLog, require_tensorboard
from difflab.visualize.images import make_grid, save_grid

NONFINITE = "non-finite steps"
# the per-example training streams (difflab.samplers.noise.image_seed): 0 is sampling's, 1 a cascade's SR stage
TRAIN_STREAM = 2
STOP_REASONS = {1: "minutes", 3: NONFINITE}


def next_examples(seed: int, num_data: int, n: int, epoch: int, pos: int, rank: int = 0, world_size: int = 1
                  ) -> tuple[torch.Tensor, list[int], int, int]:
    """The next ``n`` examples of one rank in a training job's data order: (data indices, example keys,
    epoch, position after them). Each epoch is a permutation of the ``num_data`` examples seeded by
    (``seed``, epoch), strided over the ranks; ``pos`` counts this rank's share of it. An example's key
    is its place in the whole job's stream of examples (epoch, position in the epoch's permutation), the
    same whichever rank, world size or micro-batch it lands in: the seed of its own generator. Every
    trainer (diffusion, GAN, autoencoder) draws its batches from here."""
    out, keys = [], []
    while n > 0:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_data, generator=g)[rank::world_size]
        take = perm[pos : pos + n]
        out.append(take)
        keys += [epoch * num_data + rank + world_size * j for j in range(pos, pos + len(take))]
        n -= len(take)
        pos += len(take)
        if pos >= len(perm):
            epoch, pos = epoch + 1, 0
    return torch.cat(out), keys, epoch, pos


class TrainingDiverged(DifflabError):
    """``train.max_nonfinite_steps`` steps in a row had a non-finite loss or gradient: training stopped
    without saving anything of the broken state."""


PREVIEW_SAMPLER = SamplerConfig(sampler=SamplerKind.DDIM, steps=25, eta=1.0)  # stochastic: kinder to young models
# a segmentation preview is an argmax of the sample: 10 stochastic DDIM steps show what the run has learnt
SEGMENT_PREVIEW_SAMPLER = SamplerConfig(sampler=SamplerKind.DDIM, steps=10, eta=1.0)
# at most this many validation pairs in a segmentation preview (rows image | truth | sample)
SEGMENT_PREVIEW_ROWS = 8


@dataclass(frozen=True)
class SegmentSplit:
    """A segmentation run's pairs (:class:`difflab.config.SegmentConfig`) as the trainer uses them: the
    training split's images become the trainer's ``data.images`` and ``masks`` are their masks (same
    rows); the validation split is held out (previews show its first pairs); ``augment`` moves each
    training image and its mask together."""

    masks: torch.Tensor  # (N_train, S, S) uint8 class indices
    val_images: torch.Tensor  # (N_val, 3, S, S) uint8
    val_masks: torch.Tensor  # (N_val, S, S) uint8
    augment: PairAugment | None  # None: no augmentation
    num_classes: int


def split_segment_data(pairs: PairedData, cfg: RunConfig) -> tuple[ImageData, SegmentSplit]:
    """The training images as :class:`ImageData` (no labels) and the rest of the :class:`SegmentSplit`
    of a segmentation run's pairs (split by id, :func:`difflab.data.paired.split_pairs`)."""
    seg = cfg.segment
    if tuple(pairs.classes) != seg.classes:
        raise ConfigError(f"the data's classes ({', '.join(pairs.classes)}) differ from the run's "
                          f"({', '.join(seg.classes)}); {pairs.source}")
    train, val = split_pairs(pairs, seg.val_fraction)
    images = ImageData(images=pairs.images[train].contiguous(), labels=None, source=pairs.source,
                       num_skipped=pairs.num_skipped)
    aug = None if seg.augment.is_identity else seg.augment
    return images, SegmentSplit(masks=pairs.masks[train].contiguous(), val_images=pairs.images[val].contiguous(),
                                val_masks=pairs.masks[val].contiguous(), augment=aug, num_classes=seg.num_classes)


def micro_batch(tc: TrainConfig, ranks: int, ranks_name: str = "world_size") -> int:
    """Images per rank and micro-step: ``train.batch_size`` is the global batch, split over the ranks
    and ``grad_accum``; one that does not split is a ConfigError (``ranks_name`` names the ranks' flag)."""
    per_step = ranks * tc.grad_accum
    if tc.batch_size % per_step:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by {ranks_name} * grad_accum = {per_step}")
    return tc.batch_size // per_step


def _destroy_process_group() -> None:
    """Tear the default process group down while the interpreter is still whole. Left to interpreter
    finalization, gloo's worker threads can drop tensors after Python is gone and abort the rank
    (SIGABRT, no message: a 2-rank CPU run that had finished its work)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``min_lr_ratio * lr`` at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay is LRDecay.NONE:
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, Any]]:
    """While active, SIGINT and SIGTERM set ``flag["signal"]`` instead of killing the process, so
    the loop can finish its step and save. A second signal exits at once."""
    flag: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike[str],
        *,
        data: ImageData | PairedData | None = None,
        resume: bool | Literal["auto"] = False,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.dist = DistInfo.from_env()
        tc = cfg.train
        self.micro_batch = micro_batch(tc, self.dist.world_size)
        resume, restart = open_run_dir(self.run_dir, resume)  # before minutes of decoding data
        self.device = resolve_device(device)
        if self.device.type == "cuda":  # one GPU per rank: cuda means this rank's own
            if self.device.index is None:
                self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if self.dist.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(_destroy_process_group)  # the group this trainer made goes before the interpreter does

        loaded = data if data is not None else self._load_data()
        # a segmentation run (difflab.edit.segment): the training split's images, their masks, the held-out pairs
        self.seg: SegmentSplit | None = None
        if isinstance(loaded, PairedData):
            if not cfg.segment.active:
                raise ConfigError("image/mask pairs are for a segmentation run (difflab train --task segment)")
            loaded, self.seg = split_segment_data(loaded, cfg)
        elif cfg.segment.active:
            raise ConfigError("a segmentation run trains on image/mask pairs (difflab.data.paired.load_pairs)")
        self.data: ImageData = loaded
        self.autocast = autocast_dtype(tc.precision, self.device)
        # a latent run (difflab.latent): the frozen autoencoder and the data set's latents, encoded once
        self.codec: LatentCodec | None = None
        self.latents: torch.Tensor | None = None
        if cfg.latent.active:
            self.codec, self.latents = self._encode_data(resume)
        c, h = self.latents.shape[2:4] if self.latents is not None else self.data.images.shape[1:3]
        # a segmentation run's images are the condition; the network denoises their masks
        want = cfg.model.cond_channels if self.seg is not None else cfg.model.in_channels
        if (c, h) != (want, cfg.model.image_size):
            what = "latents" if self.latents is not None else "images"
            raise ConfigError(
                f"data has {c}-channel {h}px {what} but the model expects {want}-channel "
                f"{cfg.model.image_size}px"
            )
        up = cfg.upscale
        if up.active and up.residual and not up.scale:  # measured once, then stored in the run's config
            scale = measure_scale(to_float(self.data.images[:1024]), up.from_size, cfg.loss.sigma_data)
            self.cfg = cfg = dataclasses.replace(cfg, upscale=dataclasses.replace(up, scale=scale))
        self.conditions = TrainingConditions(cfg.cond, self.data.labels, tc.cond_dropout, self.device,
                                             progress=progress and self.dist.is_main)
        self.schedule = NoiseSchedule(cfg.schedule)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(tc.seed)
            self.model = UNet(cfg.model).to(self.device)
        self.model.grad_checkpoint = tc.grad_checkpoint
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.model = to_memory_format(self.model, self.memory_format)
        self.ema = EMA(self.model, tc.ema_halflife_images, tc.ema_rampup)
        # fused: one kernel per step, and it can skip a step on the device (found_inf, see _optimizer_step)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay,
            fused=True,
        )
        # fp16 overflows where bf16 does not: scale the loss, skip steps whose gradients overflowed
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast is torch.float16 else None
        self.skipped_steps = 0
        # steps skipped for a non-finite loss or gradient: in all, and in a row (device tensors: no sync per step)
        self.nonfinite_total = torch.zeros((), device=self.device)
        self.nonfinite_run = torch.zeros((), device=self.device)
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.world_size > 1 else None
        )
        # the training forward; compiled, it shares its parameters with self.model (and the DDP wrapper)
        if tc.compile:
            require_compiler(self.device, "train.compile=true")
        self.forward_net = torch.compile(self.ddp or self.model) if tc.compile else (self.ddp or self.model)
        # the training objective around it: noise levels, target, weighting (see difflab.parametrization)
        self.objective = Denoiser(self.forward_net, self.schedule, cfg.loss, autocast=self.autocast,
                                  channels_last=tc.channels_last)
        # timesteps, noise and augmentation come from per-example generators (_batch); torch's global
        # stream (dropout) is per rank
        self.global_rng = torch.Generator().manual_seed(tc.seed + 7919 * (self.dist.rank + 1)).get_state()
        self.step, self.images_seen, self.epoch, self.pos, self.elapsed = 0, 0, 0, 0, 0.0
        self.tb: TensorBoardLog | None = None
        if tc.tensorboard and self.dist.is_main:
            require_tensorboard()  # fail before the run directory is created
        if resume:
            self._restore()
        elif self.dist.is_main:
            start_run_dir(self.run_dir, cfg.to_json(), restart)
            if self.codec is not None:  # the run carries its autoencoder: it samples even when that run moves on
                freeze(self.codec, self.run_dir, cfg.latent.autoencoder)

    # -- data --------------------------------------------------------------------------
    def _load_data(self) -> ImageData | PairedData:
        """Rank 0 decodes (and fills the cache) first; the other ranks then read the cache. A
        segmentation run reads image/mask pairs."""
        def load() -> ImageData | PairedData:
            d = self.cfg.data
            if self.cfg.segment.active:
                return load_pairs(d.source, d.image_size, progress=self.progress and self.dist.is_main)
            return load_dataset(d.source, d.image_size, d.channels or None, labels=d.labels,
                                progress=self.progress and self.dist.is_main)
        if self.dist.world_size == 1:
            return load()
        if self.dist.is_main:
            data = load()
            dist.barrier()
            return data
        dist.barrier()
        return load()

    def _encode_data(self, resume: bool) -> tuple[LatentCodec, torch.Tensor]:
        """The latent run's codec (from the autoencoder run when starting, from the copy inside the run
        when resuming) and the data set's latents (rank 0 fills the cache first, as for the images)."""
        lat = self.cfg.latent
        codec = (load_codec(self.run_dir, lat, device=self.device, autocast=self.autocast) if resume
                 else codec_from_run(lat, device=self.device, autocast=self.autocast))

        def encode() -> torch.Tensor:
            return encode_images(codec, self.data.images, hflip=self.cfg.data.augment.hflip,
                                 progress=self.progress and self.dist.is_main)
        if self.dist.world_size == 1:
            return codec, encode()
        if self.dist.is_main:
            latents = encode()
            dist.barrier()
            return codec, latents
        dist.barrier()
        return codec, encode()

    def _next_indices(self, n: int) -> tuple[torch.Tensor, list[int]]:
        """The next ``n`` images of this rank (see :func:`next_examples`)."""
        idx, keys, self.epoch, self.pos = next_examples(self.cfg.train.seed, len(self.data.images), n, self.epoch,
                                                        self.pos, self.dist.rank, self.dist.world_size)
        return idx, keys

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
        """(images on the device, their data indices, one generator per image). Every random choice
        about an example (augmentation, timestep, noise, condition dropout) comes from its own
        generator, seeded by the run's seed and the example's key: so the examples of a step get the
        same draws under any world size, and N ranks train like one process with the same global
        batch (dropout's masks aside, which come from each rank's global stream)."""
        idx, keys = self._next_indices(self.micro_batch)
        gens = image_generators(self.cfg.train.seed, keys, stream=TRAIN_STREAM)
        if self.latents is not None:  # a latent run: each example's own generator picks the mirrored view or not
            views = self.latents.shape[1]
            pick = [int(torch.randint(views, (1,), generator=g)) if views > 1 else 0 for g in gens]
            x = self.latents[idx, torch.tensor(pick, dtype=torch.long)]
            return to_device(x, self.device).contiguous(memory_format=self.memory_format), idx, gens
        x, aug = to_float(self.data.images[idx]), self.cfg.data.augment
        if not aug.is_identity:
            x = torch.cat([augment(x[i:i + 1], aug, g) for i, g in enumerate(gens)])
        return to_device(x, self.device).contiguous(memory_format=self.memory_format), idx, gens

    def _segment_batch(self, seg: SegmentSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          list[torch.Generator]]:
        """A segmentation run's batch: (one-hot masks x0 (B, K, S, S) in [-1, 1], images (B, 3, S, S),
        masks (B, S, S), data indices, one generator per example). Each example's own generator drives
        the joint augmentation of its image and mask (first), then its timestep and noise (in
        :meth:`_train_step`), as in :meth:`_batch`."""
        idx, keys = self._next_indices(self.micro_batch)
        gens = image_generators(self.cfg.train.seed, keys, stream=TRAIN_STREAM)
        images, masks = to_float(self.data.images[idx]), seg.masks[idx]
        if seg.augment is not None:
            pairs = [joint_augment(images[i], masks[i], seg.augment, g) for i, g in enumerate(gens)]
            images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        x0 = onehot(masks, seg.num_classes)
        fmt = self.memory_format
        return (to_device(x0, self.device).contiguous(memory_format=fmt),
                to_device(images, self.device).contiguous(memory_format=fmt), to_device(masks, self.device), idx, gens)

    # -- one optimizer step ------------------------------------------------------------
    def _train_step(self, sums: torch.Tensor) -> torch.Tensor:
        tc, T = self.cfg.train, self.schedule.num_timesteps
        for lr_group in self.optimizer.param_groups:
            lr_group["lr"] = lr_at(self.step, tc)
        seg = self.seg
        plain_segmenter = seg is not None and self.cfg.segment.objective is SegObjective.CE
        for micro in range(tc.grad_accum):
            if seg is not None:  # a segmentation run: the mask is what is generated, the image the condition
                x0, image, mask, idx, gens = self._segment_batch(seg)
            else:
                x0, idx, gens = self._batch()
            if plain_segmenter:  # one pass at t = 0, cross-entropy: no noise level, no noise
                t = torch.zeros(len(gens), dtype=torch.float64)
            else:
                t = torch.cat([self.objective.sample_t(1, g) for g in gens])
                noise = randn(x0.shape, gens, device=self.device).contiguous(memory_format=self.memory_format)
            if seg is not None:
                cond = {"lowres": image}
            else:
                cond = self.conditions.batch(idx, gens)
            if self.cfg.upscale.active:  # a super-resolution run: the low-resolution version is the condition
                pairs = [training_pair(x0[i:i + 1], self.cfg.upscale, g) for i, g in enumerate(gens)]
                x0, cond["lowres"] = (torch.cat(part).contiguous(memory_format=self.memory_format) for part in zip(*pairs))
            sync = contextlib.nullcontext() if self.ddp is None or micro == tc.grad_accum - 1 else self.ddp.no_sync()
            with sync:
                if plain_segmenter:
                    assert seg is not None
                    per_example = ce_loss(self.forward_net, image, mask, seg.num_classes, autocast=self.autocast,
                                          memory_format=self.memory_format)
                else:
                    per_example = self.objective.loss(x0, t, noise, **cond)
            loss = per_example.mean() / tc.grad_accum
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            with torch.no_grad():  # loss sums per timestep quartile, read only at log time (no sync per step)
                q = to_device((t * 4 / T).floor().long().clamp(0, 3), self.device)
                value = per_example.detach().float()
                finite = torch.isfinite(value)  # a skipped step's NaNs stay out of the logged loss
                sums[0].index_add_(0, q, torch.where(finite, value, 0.0))
                sums[1].index_add_(0, q, finite.float())
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        if self.scaler is None:
            self._optimizer_step(grad_norm)
        else:  # skips the step if any gradient overflowed, then adapts the scale (a host read per step)
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += int(self.scaler.get_scale() < scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.images_seen += tc.batch_size
        self.ema.update(self.model, self.images_seen, tc.batch_size)
        return grad_norm

    def _optimizer_step(self, grad_norm: torch.Tensor) -> None:
        """The AdamW step, skipped on the device when the loss or a gradient is not finite (the global
        norm is then inf or NaN): the fused kernel's ``found_inf`` input, the one GradScaler uses, leaves
        weights, moments and Adam's step count untouched. Skips are counted without a host sync."""
        bad = (~torch.isfinite(grad_norm)).float()
        opt: Any = self.optimizer
        opt.grad_scale, opt.found_inf = None, bad
        try:
            self.optimizer.step()
        finally:
            opt.found_inf = None
        self.nonfinite_total += bad
        self.nonfinite_run.add_(bad).mul_(bad)

    # -- the loop ------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until max_steps, the minutes budget, ``stop_at`` (tests) or a signal; then save."""
        tc = self.cfg.train
        end = min(tc.max_steps, stop_at or tc.max_steps)
        start_time, start_step, elapsed_before = time.monotonic(), self.step, self.elapsed
        sums = torch.zeros(2, 4, device=self.device)
        last_log_time, last_log_step = start_time, self.step
        reason = "max_steps"
        # with a time budget the bar counts seconds (its ETA is then true); otherwise steps
        timed = bool(tc.minutes)
        bar = tqdm(total=round(tc.minutes * 60) if timed else tc.max_steps, initial=0 if timed else self.step,
                   desc="training", unit="s" if timed else "step", disable=not (self.progress and self.dist.is_main),
                   dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]" if timed else None)
        if tc.tensorboard and self.dist.is_main:
            self.tb = TensorBoardLog(self.run_dir, self.step)
        with torch.random.fork_rng(devices=[]), stop_requests() as stop, fast_matmul(self.device):
            torch.set_rng_state(self.global_rng)
            self.model.train()
            while self.step < end:
                grad_norm = self._train_step(sums)
                agreed = self._agree_stop(stop["signal"], bool(tc.minutes) and time.monotonic() - start_time >= tc.minutes * 60,
                                          self.step >= end)
                if agreed == NONFINITE:  # nothing of this state is logged, previewed or saved
                    reason = agreed
                    break
                if timed:
                    bar.update(min(time.monotonic() - start_time, tc.minutes * 60) - bar.n)
                else:
                    bar.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    now = time.monotonic()
                    rate = (self.step - last_log_step) * tc.batch_size / max(now - last_log_time, 1e-9)
                    record = self._log(sums, grad_norm, rate)
                    bar.set_postfix(step=self.step, loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                    sums.zero_()
                    last_log_time, last_log_step = now, self.step
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.save_samples()
                if self.step % tc.checkpoint_every == 0 and self.step < end:
                    # what the next step needs: dropout's stream as it is now, the time trained so far
                    self.global_rng = torch.get_rng_state()
                    self.elapsed = elapsed_before + time.monotonic() - start_time
                    self.save()
                if agreed is not None:
                    reason = agreed
                    break
            if reason == NONFINITE:
                bar.close()
                if self.tb is not None:
                    self.tb.close()
                    self.tb = None
                raise TrainingDiverged(
                    f"training diverged at step {self.step}: {tc.max_nonfinite_steps} steps in a row had a non-finite "
                    f"loss or gradient (skipped, nothing saved); last good checkpoint: {self._last_checkpoint()} "
                    "(lower train.lr, or keep train.grad_clip > 0)")
            self.global_rng = torch.get_rng_state()
            self.elapsed = elapsed_before + time.monotonic() - start_time
            self.save()
            if tc.sample_every and self.step % tc.sample_every:
                self.save_samples()
        bar.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        return {"step": self.step, "stopped_by": reason, "steps_this_run": self.step - start_step,
                "seconds": time.monotonic() - start_time, "run_dir": str(self.run_dir)}

    def _agree_stop(self, signal_name: str | None, out_of_time: bool, last: bool) -> str | None:
        """Why to stop after this step, the same answer on every rank, or None: one collective per step
        (the most severe of the ranks' reasons wins), so no rank leaves the others waiting in an
        all-reduce. ``train.max_nonfinite_steps`` skipped steps in a row stop the run; a single process
        reads that count every step on a CPU (free) and at log and checkpoint steps on a GPU (a host
        read per step would stall it; skipped steps change nothing, so a later stop loses nothing).
        Under fp16's gradient scaler an overflow is the scaler's skipped step, not counted here."""
        local = 0
        if out_of_time:
            local = 1
        if signal_name:
            local = 2
        diverged = self.nonfinite_run >= self.cfg.train.max_nonfinite_steps
        if self.dist.world_size == 1:
            tc = self.cfg.train
            check = (self.device.type == "cpu" or self.step % tc.log_every == 0 or self.step % tc.checkpoint_every == 0
                     or local or last)
            if check and bool(diverged):  # before anything is logged or saved
                return NONFINITE
            return None if local == 0 else STOP_REASONS[local] if local == 1 else signal_name
        code = torch.where(diverged, torch.tensor(3.0, device=self.device),
                           torch.tensor(float(local), device=self.device)).reshape(1)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        agreed = int(code.item())
        if agreed == 2:
            return signal_name or "signal (another rank)"
        return None if agreed == 0 else STOP_REASONS[agreed]

    def _last_checkpoint(self) -> str:
        try:
            return str(self.run_dir / json.loads((self.run_dir / LATEST).read_text())["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError):
            return "none saved yet"

    def _log(self, sums: torch.Tensor, grad_norm: torch.Tensor, images_per_s: float) -> dict[str, Any]:
        if self.dist.world_size > 1:  # the whole job's loss, not rank 0's alone (at log steps only)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        s = sums.cpu()
        total = float(s[0].sum() / s[1].sum().clamp(min=1))
        record = {
            "step": self.step, "images_seen": self.images_seen, "loss": total,
            "loss_quartiles": [float(s[0, q] / s[1, q]) if s[1, q] > 0 else None for q in range(4)],
            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
            "images_per_s": images_per_s, "time": time.time(),
        }
        if self.scaler is not None:
            record["grad_scale"], record["skipped_steps"] = self.scaler.get_scale(), self.skipped_steps
        else:
            record["nonfinite_steps"] = int(self.nonfinite_total)
        if self.dist.is_main:
            log = self.run_dir / "log.jsonl"
            try:
                with open(log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise OutputError(f"could not write {log}: {e.strerror or e}; the last checkpoint "
                                  f"{self._last_checkpoint()} is intact") from None
            if self.tb is not None:
                self.tb.scalars(record)
        return record

    # -- outputs -------------------------------------------------------------------------
    def denoiser(self, use_ema: bool = True) -> Denoiser:
        """The network as a denoiser for previews, in the training precision and memory layout."""
        clip = "none" if self.codec is not None else "clip"  # latents have no [-1, 1] range
        return Denoiser((self.ema.model if use_ema else self.model), self.schedule, self.cfg.loss, clip=clip,
                        autocast=self.autocast, channels_last=self.cfg.train.channels_last)

    @torch.no_grad()
    def save_samples(self) -> None:
        """A grid from fixed seeds with the EMA weights, so grids of successive steps compare."""
        if not self.dist.is_main or not self.cfg.train.sample_grid_size:
            return
        if self.seg is not None:
            self._save_segment_preview(self.seg)
            return
        c, s = self.cfg.model.in_channels, self.cfg.model.image_size
        with torch.random.fork_rng(devices=[]):  # sampling must not disturb training randomness
            n = self.cfg.train.sample_grid_size
            if self.cfg.upscale.active:  # the first training images, downscaled and upscaled again
                low = resize(to_float(self.data.images[: min(n, len(self.data.images))]), self.cfg.upscale.from_size)
                imgs = torch.cat([b for _, b in upscale_batches(self.denoiser(), low, self.cfg.upscale, s, PREVIEW_SAMPLER,
                                                                seed=self.cfg.train.seed, device=self.device, progress=False)])
            else:
                imgs = sample(self.denoiser(), n, (c, s, s), PREVIEW_SAMPLER, seed=self.cfg.train.seed, batch_size=64,
                              device=self.device, progress=False, **self.conditions.preview(n))
                if self.codec is not None:  # latents -> images
                    imgs = self.codec.decode(imgs)
        out = self.run_dir / "samples"
        save_grid(imgs, out / f"step-{self.step:07d}.png", scale=2)
        save_grid(imgs, out / "latest.png", scale=2)
        if self.tb is not None:
            self.tb.grid(make_grid(to_uint8(imgs.cpu())), self.step)

    @torch.no_grad()
    def _save_segment_preview(self, seg: SegmentSplit) -> None:
        """A segmentation run's preview: rows image | true mask | sampled mask (colourised) for the first
        validation pairs (the first training pairs when none are held out), EMA weights, fixed seeds."""
        n = min(self.cfg.train.sample_grid_size, SEGMENT_PREVIEW_ROWS)
        images, masks = (seg.val_images, seg.val_masks) if len(seg.val_images) else (self.data.images, seg.masks)
        images, masks = images[:n], masks[:n]
        x = to_device(to_float(images), self.device)
        with torch.random.fork_rng(devices=[]):  # sampling must not disturb training randomness
            if self.cfg.segment.objective is SegObjective.CE:
                pred = to_mask(ce_logits(self.ema.model, x, seg.num_classes, autocast=self.autocast,
                                         memory_format=self.memory_format))
            else:
                pred = to_mask(torch.cat([b for _, b in segment_batches(
                    self.denoiser(), x, seg.num_classes, SEGMENT_PREVIEW_SAMPLER, seed=self.cfg.train.seed,
                    device=self.device, progress=False)]))
        tiles = [t for i in range(len(images)) for t in (images[i], colorize(masks[i]), colorize(pred[i].cpu()))]
        grid = torch.stack(tiles)
        out = self.run_dir / "samples"
        save_grid(grid, out / f"step-{self.step:07d}.png", nrow=3, scale=2)
        save_grid(grid, out / "latest.png", nrow=3, scale=2)
        if self.tb is not None:
            self.tb.grid(make_grid(grid, nrow=3), self.step)

    def save(self) -> None:
        """Rank 0 writes the checkpoint (atomically), with every rank's random streams; the other
        ranks wait for it at a barrier."""
        mine = self.global_rng
        if self.dist.world_size == 1:
            self._save_main([mine])
            return
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, mine)
        try:
            self._save_main(gathered)
        finally:
            dist.barrier()

    def _save_main(self, rng_states: list[Any]) -> None:
        if not self.dist.is_main:
            return
        optim_tensors, optim_meta = optimizer_to_tensors(self.optimizer)
        train_state = {f"optim.{k}": v for k, v in optim_tensors.items()}
        for r, glob in enumerate(rng_states):  # every rank's stream, so a resume continues each
            train_state[f"rng.global.{r}"] = glob
        state = {
            "step": self.step, "images_seen": self.images_seen, "epoch": self.epoch, "pos": self.pos,
            "elapsed_seconds": self.elapsed, "optimizer": optim_meta, "world_size": self.dist.world_size,
            "nonfinite_steps": int(self.nonfinite_total), "nonfinite_in_a_row": int(self.nonfinite_run),
        }
        if self.scaler is not None:
            state["grad_scaler"], state["skipped_steps"] = self.scaler.state_dict(), self.skipped_steps
        save_checkpoint(
            self.run_dir, self.step,
            {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(), "train_state": train_state},
            state, self.cfg.train.keep_checkpoints,
        )

    def _restore(self) -> None:
        """Continue from the newest checkpoint that loads (a damaged one is reported and the one
        before it is used, see :func:`~difflab.train.checkpoint.load_newest_good`)."""
        found = load_newest_good(self.run_dir, self._load_state, quarantine=self.dist.is_main)
        if found is None:
            raise CheckpointError(f"--resume: run {self.run_dir} has no checkpoint yet")
        if self.dist.is_main:
            self._trim_log()

    def _load_state(self, ckpt: Checkpoint) -> None:
        st = ckpt.state
        saved_world = st.get("world_size", 1)
        load_weights(self.model, ckpt.tensors("model"), ckpt.path / "model.safetensors", self.run_dir / CONFIG)
        load_weights(self.ema.model, ckpt.tensors("ema"), ckpt.path / "ema.safetensors", self.run_dir / CONFIG)
        ts = ckpt.tensors("train_state")
        optimizer_from_tensors(self.optimizer, {k[6:]: v for k, v in ts.items() if k.startswith("optim.")}, st["optimizer"])
        for group in self.optimizer.param_groups:  # checkpoints written before the fused step say otherwise
            group["fused"], group["foreach"] = True, None
        self.step, self.images_seen = st["step"], st["images_seen"]
        self.epoch, self.elapsed = st["epoch"], st["elapsed_seconds"]
        self.nonfinite_total.fill_(st.get("nonfinite_steps", 0))
        self.nonfinite_run.fill_(st.get("nonfinite_in_a_row", 0))
        r = self.dist.rank
        if saved_world == self.dist.world_size:  # each rank continues its own stream: bit-identical
            suffix = f".{r}" if f"rng.global.{r}" in ts else ""  # no suffix: a checkpoint from before per-rank streams
            self.global_rng = ts[f"rng.global{suffix}"]
            self.pos = st["pos"]
        else:  # another world size, same global batch: the epoch's permutation continues where the job was
            consumed = st["pos"] * saved_world  # images of this epoch the whole job had used (rank-strided slices)
            self.pos = -(-consumed // self.dist.world_size)
            self.global_rng = torch.Generator().manual_seed(self.cfg.train.seed + 7919 * (r + 1) + 7 * self.step).get_state()
            if self.dist.is_main:
                dropout = self.cfg.model.dropout > 0
                warnings.warn(f"--resume: run {self.run_dir} was trained with {saved_world} process(es), now "
                              f"{self.dist.world_size}: the same global batch, data order and per-example noise"
                              + ("; dropout's masks come from fresh per-rank streams" if dropout else ""),
                              DifflabWarning, stacklevel=2)
        if self.scaler is not None and "grad_scaler" in st:
            self.scaler.load_state_dict(st["grad_scaler"])
            self.skipped_steps = st.get("skipped_steps", 0)

    def _trim_log(self) -> None:
        """Drop the log records of steps after the checkpoint (written before a crash, about to be redone)."""
        log = self.run_dir / "log.jsonl"
        if not log.is_file():
            return
        lines = log.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by the crash
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= self.step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            atomic_write_bytes(log, "".join(keep).encode())

