"""The KL-autoencoder training loop (LDM's first stage, without the perceptual loss).

Each step: encode a batch, draw z = mean + std * eps (eps from each example's own generator), decode,
and minimise ``l1`` x the per-example summed |x - x_hat| + ``kl_weight`` x KL(q(z|x) || N(0, I)); once
``step >= loss.disc_start`` (and ``loss.disc_weight`` > 0) also the PatchGAN hinge loss, weighted by
``disc_weight`` x LDM's adaptive weight, followed by one discriminator update on (x, x_hat). Then the
EMA of the autoencoder (:class:`difflab.train.ema.EMA`).

Shared with the other trainers: data loading (cached), the data set's augmentation, per-example
generators (:func:`difflab.samplers.noise.image_generators`, stream 4), atomic checkpoints
(``model.safetensors`` = the raw autoencoder, ``ema.safetensors`` = its EMA; the discriminator and both
optimisers in ``train_state``), log.jsonl, SIGINT/SIGTERM handling, bf16 autocast where it pays. A resumed
run is bit-identical to an uninterrupted one on the same machine.

The last ``train.holdout`` images of the data (its sorted order) are never trained on. At the end of
:meth:`AutoencoderTrainer.run`, after the final save, the EMA weights are measured
(:mod:`difflab.autoencoder.report`) and ``report.json`` is written: latent mean and std per channel
over up to 4096 training images, the held-out reconstruction PSNR and (holdout >= 50, FID network
available) the held-out reconstruction FID. A non-finite loss stops training at the next check naming
the first bad step, saving nothing of the broken state. One process only (no DDP).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch

from difflab.autoencoder.config import AutoencoderConfig
from difflab.autoencoder.model import (
    Autoencoder,
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl,
)
from difflab.autoencoder.report import FID_MIN_IMAGES, latent_stats, psnr, reconstruct, reconstruction_fid
from difflab.data.augment import augment
from difflab.data.dataset import ImageData, load_dataset, to_float
from difflab.devices import resolve_device, to_device
from difflab.errors import CheckpointError, ConfigError
from difflab.io import atomic_write_bytes
from difflab.precision import autocast_context, autocast_dtype, to_memory_format
from difflab.samplers.noise import image_generators, randn
from difflab.train.checkpoint import (
    CONFIG,
    Checkpoint,
    load_newest_good,
    load_weights,
    open_run_dir,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    start_run_dir,
)
from difflab.train.ema import EMA
from difflab.train.loop import DistInfo, TrainingDiverged, next_examples
from difflab.train.steploop import StepLoop
from difflab.visualize.images import save_grid

# the per-example streams (difflab.samplers.noise.image_seed): 0 sampling, 1 a cascade's SR stage,
# 2 diffusion training, 3 GAN training, 4 autoencoder training
AE_STREAM = 4
REPORT = "report.json"
STATS_IMAGES = 4096  # training images the latent statistics are measured on (at most)
PREVIEW_IMAGES = 8
# the log's running sums: total loss, mean |x - x_hat|, KL per example, G loss, D weight, D loss, D steps, steps
LOSS, L1, KL, G_LOSS, D_WEIGHT, D_LOSS, D_STEPS, STEPS = range(8)


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    return Autoencoder(cfg.net, cfg.data.channels)


class AutoencoderTrainer(StepLoop):
    def __init__(
        self,
        cfg: AutoencoderConfig,
        run_dir: str | os.PathLike[str],
        *,
        data: ImageData | None = None,
        resume: bool | Literal["auto"] = False,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        if DistInfo.from_env().world_size > 1:
            raise ConfigError("difflab train-autoencoder runs in one process: start it without torchrun")
        resume, restart = open_run_dir(self.run_dir, resume)  # before minutes of decoding data
        self.device = resolve_device(device)
        d, tc = cfg.data, cfg.train
        self.data = data if data is not None else load_dataset(d.source, d.image_size, d.channels, progress=progress)
        if tuple(self.data.images.shape[1:]) != cfg.image_shape:
            raise ConfigError(f"data has {tuple(self.data.images.shape[1:])} images but the run expects {cfg.image_shape} "
                              "(channels, height, width)")
        n = len(self.data.images)
        if n - tc.holdout < 1:
            raise ConfigError(f"train.holdout={tc.holdout} holds out all {n} images of {self.data.source}; "
                              f"lower --holdout (below {n})")
        self.train_images = self.data.images[: n - tc.holdout]
        self.holdout_images = self.data.images[n - tc.holdout:]
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(tc.seed)
            ae = build_autoencoder(cfg)
            disc = PatchDiscriminator(cfg.net.disc_width, cfg.data.channels) if cfg.loss.disc else None
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.ae = to_memory_format(ae.to(self.device), self.memory_format)
        self.D = to_memory_format(disc.to(self.device), self.memory_format) if disc is not None else None
        self.ema = EMA(self.ae, tc.ema_halflife_images, tc.ema_rampup)
        betas = (tc.adam_beta1, tc.adam_beta2)
        self.opt_ae = torch.optim.Adam(self.ae.parameters(), lr=tc.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=tc.lr, betas=betas) if self.D is not None else None
        dtype = autocast_dtype(tc.precision, self.device)
        self.autocast = None if dtype is torch.float16 else dtype  # auto on an fp16-only GPU: fp32
        self.step, self.images_seen, self.epoch, self.pos, self.elapsed = 0, 0, 0, 0, 0.0
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # the first step with a non-finite loss
        if resume:
            self._restore()
        else:
            start_run_dir(self.run_dir, cfg.to_json(), restart)

    # -- data ---------------------------------------------------------------------------------
    def _next_indices(self, n: int) -> tuple[torch.Tensor, list[int]]:
        """The next ``n`` images (data indices) and their keys (:func:`difflab.train.loop.next_examples`)."""
        idx, keys, self.epoch, self.pos = next_examples(self.cfg.train.seed, len(self.train_images), n, self.epoch, self.pos)
        return idx, keys

    def _batch(self) -> tuple[torch.Tensor, list[torch.Generator]]:
        idx, keys = self._next_indices(self.cfg.train.batch_size)
        gens = image_generators(self.cfg.train.seed, keys, stream=AE_STREAM)
        x, aug = to_float(self.train_images[idx]), self.cfg.data.augment
        if not aug.is_identity:
            x = torch.cat([augment(x[i:i + 1], aug, g) for i, g in enumerate(gens)])
        return to_device(x, self.device).contiguous(memory_format=self.memory_format), gens

    def _autocast(self) -> torch.autocast:
        return autocast_context(self.device, self.autocast)

    # -- one step ---------------------------------------------------------------------------------
    def _step(self, x: torch.Tensor, gens: list[torch.Generator], sums: torch.Tensor) -> torch.Tensor:
        """One autoencoder update (and one discriminator update once it is on); the total loss."""
        lc = self.cfg.loss
        use_disc = self.D is not None and self.step >= lc.disc_start
        with self._autocast():
            mean, logvar = self.ae.encode(x)
            z = self.ae.sample(mean, logvar, randn(mean.shape, gens, device=self.device))
            x_hat = self.ae.decode(z)
        err = (x - x_hat).abs()
        rec = lc.l1 * err.flatten(1).sum(1).mean()
        kl_loss = kl(mean, logvar).mean()
        loss = rec + lc.kl_weight * kl_loss
        if use_disc:
            assert self.D is not None
            self.D.requires_grad_(False)
            with self._autocast():
                g_loss = hinge_g_loss(self.D(x_hat))
            weight = (adaptive_weight(rec, g_loss, self.ae.last_layer) if lc.adaptive_disc_weight
                      else torch.ones((), device=self.device)) * lc.disc_weight
            loss = loss + weight * g_loss
            sums[G_LOSS] += g_loss.detach()
            sums[D_WEIGHT] += weight
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ae.step()
        sums[LOSS] += loss.detach()
        sums[L1] += err.detach().mean()
        sums[KL] += kl_loss.detach()
        if not use_disc:
            return loss.detach()
        assert self.D is not None and self.opt_d is not None
        self.D.requires_grad_(True)
        with self._autocast():
            d_loss = hinge_d_loss(self.D(x.detach()), self.D(x_hat.detach()))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        sums[D_LOSS] += d_loss.detach()
        sums[D_STEPS] += 1
        return loss.detach() + d_loss.detach()

    # -- the shared step loop (difflab.train.steploop) -----------------------------------------------------------
    log_sums = 8

    def loop_description(self) -> str:
        return "training autoencoder"

    def train_modules(self) -> list[torch.nn.Module]:
        return [self.ae] + ([self.D] if self.D is not None else [])

    def ema_source(self) -> torch.nn.Module:
        return self.ae

    def train_step(self, sums: torch.Tensor) -> torch.Tensor:
        x, gens = self._batch()
        return torch.isfinite(self._step(x, gens, sums))

    def log_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"l1": f"{record['l1']:.4f}", "kl": f"{record['kl']:.1f}"}

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until max_steps, the minutes budget, ``stop_at`` (tests) or a signal; save; write the report."""
        result = self.run_loop(stop_at)
        return {**result, "report": self.write_report()}

    def check_finite(self) -> None:
        bad = int(self.first_bad)
        if bad:
            raise TrainingDiverged(f"autoencoder training diverged at step {bad}: the loss is NaN or infinite; nothing "
                                   f"after it was saved, {self.last_good()} (lower train.lr, or loss.disc_weight)")

    def write_log(self, sums: torch.Tensor, images_per_s: float) -> dict[str, Any]:
        s = sums.cpu().tolist()
        n, nd = max(s[STEPS], 1.0), s[D_STEPS]
        record = {
            "step": self.step, "images_seen": self.images_seen, "loss": s[LOSS] / n, "l1": s[L1] / n, "kl": s[KL] / n,
            "loss_g": s[G_LOSS] / nd if nd else None, "disc_weight": s[D_WEIGHT] / nd if nd else None,
            "loss_d": s[D_LOSS] / nd if nd else None, "images_per_s": images_per_s, "time": time.time(),
        }
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    # -- outputs --------------------------------------------------------------------------------
    @property
    def ema_autoencoder(self) -> Autoencoder:
        """The EMA weights, as an :class:`Autoencoder`."""
        assert isinstance(self.ema.model, Autoencoder)
        return self.ema.model

    def _preview_images(self) -> torch.Tensor:
        pool = self.holdout_images if len(self.holdout_images) else self.train_images
        return pool[:PREVIEW_IMAGES]

    def save_samples(self) -> None:
        """Inputs (first row) and their EMA reconstructions (second row) of fixed held-out images."""
        imgs = self._preview_images()
        rec = reconstruct(self.ema_autoencoder, imgs, device=self.device, autocast=self.autocast,
                          channels_last=self.cfg.train.channels_last)
        grid, scale = torch.cat([imgs, rec]), 2 if self.cfg.data.image_size <= 32 else 1
        out = self.run_dir / "samples"
        save_grid(grid, out / f"step-{self.step:07d}.png", nrow=len(imgs), scale=scale)
        save_grid(grid, out / "latest.png", nrow=len(imgs), scale=scale)

    def write_report(self) -> dict[str, Any]:
        """Measure the EMA autoencoder (latent statistics, held-out PSNR and FID) into RUN/report.json."""
        ae, tc = self.ema_autoencoder, self.cfg.train
        n = len(self.train_images)
        idx = torch.linspace(0, n - 1, min(n, STATS_IMAGES)).round().long().unique()  # spread over the data
        kw: dict[str, Any] = {"device": self.device, "channels_last": tc.channels_last}
        mean, std = latent_stats(ae, self.train_images[idx], **kw)
        held = self.holdout_images
        psnr_db: float | None = None
        fid: float | None = None
        if len(held):
            rec = reconstruct(ae, held, **kw)
            psnr_db = float(psnr(held, rec).mean())
            if len(held) >= FID_MIN_IMAGES:
                fid = reconstruction_fid(held, rec, device=self.device)
        report = {"step": self.step, "latent_mean": mean, "latent_std": std, "psnr": psnr_db, "fid": fid,
                  "holdout": len(held), "train_images": n, "stats_images": len(idx)}
        atomic_write_bytes(self.run_dir / REPORT, (json.dumps(report, indent=2) + "\n").encode())
        shown = f"held-out PSNR {psnr_db:.2f} dB" if psnr_db is not None else "no held-out images"
        shown += f", reconstruction FID {fid:.2f}" if fid is not None else ""
        print(f"autoencoder at step {self.step}: {shown} ({len(held)} images); latent std "
              f"{', '.join(f'{s:.3f}' for s in std)}, mean {', '.join(f'{m:+.3f}' for m in mean)}; "
              f"report: {self.run_dir / REPORT}")
        return report

    def save(self) -> None:
        """An atomic checkpoint of the autoencoder, its EMA, the discriminator, both optimisers and the
        data position; refuses non-finite weights (the previous checkpoint then stays the latest)."""
        modules = [("autoencoder", self.ae), ("EMA autoencoder", self.ema.model)]
        if self.D is not None:
            modules.append(("discriminator", self.D))
        for name, module in modules:
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise TrainingDiverged(f"autoencoder training diverged by step {self.step}: the {name}'s weights are "
                                       f"not finite; nothing was saved, {self.last_good()}")
        train_state: dict[str, torch.Tensor] = {}
        metas: dict[str, Any] = {}
        for name, opt in (("optim_ae", self.opt_ae), ("optim_d", self.opt_d)):
            if opt is not None:
                tensors, metas[name] = optimizer_to_tensors(opt)
                train_state.update({f"{name}.{k}": v for k, v in tensors.items()})
        if self.D is not None:
            train_state.update({f"discriminator.{k}": v for k, v in self.D.state_dict().items()})
        state = {"step": self.step, "images_seen": self.images_seen, "epoch": self.epoch, "pos": self.pos,
                 "elapsed_seconds": self.elapsed, "family": self.cfg.family, **metas}
        save_checkpoint(self.run_dir, self.step,
                        {"model": self.ae.state_dict(), "ema": self.ema.model.state_dict(), "train_state": train_state},
                        state, self.cfg.train.keep_checkpoints)

    def _restore(self) -> None:
        """Continue from the newest checkpoint that loads (a damaged one is named in a warning and set
        aside, :func:`~difflab.train.checkpoint.load_newest_good`)."""
        if load_newest_good(self.run_dir, self._load_state) is None:
            raise CheckpointError(f"--resume: run {self.run_dir} has no checkpoint yet")

    def _load_state(self, ckpt: Checkpoint) -> None:
        config = self.run_dir / CONFIG
        for name, module in (("model", self.ae), ("ema", self.ema.model)):
            load_weights(module, ckpt.tensors(name), ckpt.path / f"{name}.safetensors", config)
        ts, st = ckpt.tensors("train_state"), ckpt.state
        if self.D is not None:
            prefix = "discriminator."
            load_weights(self.D, {k[len(prefix):]: v for k, v in ts.items() if k.startswith(prefix)},
                         ckpt.path / "train_state.safetensors", config)
        for name, opt in (("optim_ae", self.opt_ae), ("optim_d", self.opt_d)):
            if opt is not None:
                prefix = name + "."
                optimizer_from_tensors(opt, {k[len(prefix):]: v for k, v in ts.items() if k.startswith(prefix)}, st[name])
                tc = self.cfg.train  # the config's learning rate and betas, not the saved ones: --resume --lr changes them
                for group in opt.param_groups:
                    group["lr"], group["betas"] = tc.lr, (tc.adam_beta1, tc.adam_beta2)
        self.step, self.images_seen, self.epoch, self.pos = st["step"], st["images_seen"], st["epoch"], st["pos"]
        self.elapsed = st["elapsed_seconds"]

