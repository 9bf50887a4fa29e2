"""The GAN training loop, for both kinds (StyleGAN2-style and denoising-diffusion GAN).

Each step: one discriminator update (non-saturating logistic loss; every ``r1_every`` steps also the
lazy R1 penalty on the reals, weighted by ``r1_every``), then one generator update, then the generator
EMA (:class:`difflab.train.ema.EMA`, half-life in images). Everything D sees, real and fake, goes
through DiffAugment first (:mod:`difflab.gan.diffaug`; ``train.diffaug``, off by default for ddgan).

Shared with the diffusion trainer: data loading (:func:`difflab.data.dataset.load_dataset`, cached),
the data set's own augmentation (``data.augment``), per-example generators, checkpoints
(:func:`difflab.train.checkpoint.save_checkpoint`: atomic safetensors, ``model.safetensors`` = the
raw generator, ``ema.safetensors`` = the EMA generator, plus ``discriminator`` and ``train_state``),
log.jsonl, sample grids, SIGINT/SIGTERM handling (finish the step, save, exit).

Reproducibility: the data order is a per-epoch permutation seeded by the config; every random draw
about an example (latents, noise inputs, style mixing, DDGAN timestep and noise, DiffAugment) comes
from that example's own generator, seeded by the run's seed and the example's place in the stream of
examples; nothing uses torch's global RNG. With the optimisers, EMA and data position in every
checkpoint, a resumed run is bit-identical to an uninterrupted one on the same machine.

Divergence: a NaN or infinite loss stops training at the next check (every log or checkpoint step
and the last), naming the first bad step, and saves nothing of the broken state (the last checkpoint
stays the latest). A collapsed discriminator (the generator's loss above ``collapse_g_loss`` for
``collapse_logs`` log intervals in a row: D rejects every fake with certainty and G gets no useful
gradient) also stops training without saving, with a one-line error.
One process only (no DDP).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch

from difflab.data.augment import augment
from difflab.data.dataset import ImageData, load_dataset, to_float
from difflab.devices import resolve_device, to_device
from difflab.errors import CheckpointError, ConfigError
from difflab.gan import ddgan, diffaug, losses
from difflab.gan.config import GANConfig, GANKind
from difflab.gan.sample import build_networks, generate
from difflab.gan.stylegan import StyleGenerator
from difflab.samplers.noise import image_generators, randn
from difflab.schedule import NoiseSchedule
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
# 2 diffusion training, 3 GAN training
GAN_STREAM = 3
# the log's running sums: D loss, G loss, R1 sum, R1 count, D(real) mean, D(fake) mean, steps
D_LOSS, G_LOSS, R1, R1_N, D_REAL, D_FAKE, STEPS = range(7)


class TrainingCollapsed(TrainingDiverged):
    """The discriminator won outright for many log intervals: training stopped without saving."""


class GANTrainer(StepLoop):
    def __init__(
        self,
        cfg: GANConfig,
        run_dir: str | os.PathLike[str],
        *,
        data: ImageData | None = None,
        resume: bool | Literal["auto"] = False,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        if DistInfo.from_env().world_size > 1:
            raise ConfigError("difflab gan train runs in one process: start it without torchrun")
        resume, restart = open_run_dir(self.run_dir, resume)  # before minutes of decoding data
        self.device = resolve_device(device)
        d = cfg.data
        self.data = data if data is not None else load_dataset(d.source, d.image_size, d.channels, progress=progress)
        if tuple(self.data.images.shape[1:]) != cfg.image_shape:
            raise ConfigError(f"data has {tuple(self.data.images.shape[1:])} images but the run expects {cfg.image_shape} "
                              "(channels, height, width)")
        tc = cfg.train
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(tc.seed)
            G, D = build_networks(cfg)
        self.G, self.D = G.to(self.device), D.to(self.device)
        self.ema = EMA(self.G, tc.ema_halflife_images, tc.ema_rampup)
        betas = (tc.adam_beta1, tc.adam_beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=tc.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=tc.lr_d, betas=betas)
        self.schedule = NoiseSchedule(cfg.schedule) if cfg.kind is GANKind.DDGAN else None
        self.groups = 2 if cfg.kind is GANKind.DDGAN else 1  # D sees (x_{t-1}, x_t) pairs
        self.step, self.images_seen, self.epoch, self.pos, self.elapsed, self.collapse_count = 0, 0, 0, 0, 0.0, 0
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # the first step with a non-finite loss
        if resume:
            self._restore()
        else:
            start_run_dir(self.run_dir, cfg.to_json(), restart)

    # -- data ---------------------------------------------------------------------------------
    def _next_indices(self, n: int) -> tuple[torch.Tensor, list[int]]:
        """The next ``n`` images (data indices) and their keys (:func:`difflab.train.loop.next_examples`)."""
        idx, keys, self.epoch, self.pos = next_examples(self.cfg.train.seed, len(self.data.images), n, self.epoch, self.pos)
        return idx, keys

    def _batch(self) -> tuple[torch.Tensor, list[torch.Generator]]:
        idx, keys = self._next_indices(self.cfg.train.batch_size)
        gens = image_generators(self.cfg.train.seed, keys, stream=GAN_STREAM)
        x, aug = to_float(self.data.images[idx]), self.cfg.data.augment
        if not aug.is_identity:
            x = torch.cat([augment(x[i:i + 1], aug, g) for i, g in enumerate(gens)])
        return to_device(x, self.device), gens

    # -- the two updates ------------------------------------------------------------------------
    def _pairs(self, x0: torch.Tensor, gens: list[torch.Generator], update_w_avg: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(real, fake, condition image, t) for D. StyleGAN: the reals and G's images. DDGAN: for a
        random level t per example, a real pair's x_{t-1} and the fake x_{t-1} on the same x_t."""
        if self.cfg.kind is GANKind.STYLEGAN:
            assert isinstance(self.G, StyleGenerator)
            lat = self.G.draw_latents(gens, self.device, mixing=self.cfg.train.style_mixing)
            return x0, self.G(update_w_avg=update_w_avg, **lat), None, None
        assert self.schedule is not None
        T = self.schedule.num_timesteps
        t = torch.stack([torch.randint(T, (), generator=g) for g in gens])
        noise_t, noise_real = randn(x0.shape, gens, device=self.device), randn(x0.shape, gens, device=self.device)
        z = randn((len(gens), self.cfg.net.z_dim), gens, device=self.device)
        noise_fake = randn(x0.shape, gens, device=self.device)
        real, x_t = ddgan.training_pairs(self.schedule, x0, t, noise_t, noise_real)
        fake = ddgan.reverse_step(self.G, self.schedule, x_t, t, z, noise_fake)
        return real, fake, x_t, t

    def _logits(self, x: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor | None,
                params: diffaug.Params) -> torch.Tensor:
        inp = x if cond is None else torch.cat([x, cond], dim=1)
        return self.D(diffaug.apply(inp, params, self.groups), t)

    def _d_step(self, x0: torch.Tensor, gens: list[torch.Generator], sums: torch.Tensor) -> torch.Tensor:
        tc, size = self.cfg.train, self.cfg.data.image_size
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with torch.no_grad():
            real, fake, cond, t = self._pairs(x0, gens, update_w_avg=True)
        aug_real, aug_fake = diffaug.draw(tc.policy, gens, size), diffaug.draw(tc.policy, gens, size)
        do_r1 = tc.r1_gamma > 0 and self.step % tc.r1_every == 0
        real = real.detach().requires_grad_(do_r1)
        real_logits, fake_logits = self._logits(real, cond, t, aug_real), self._logits(fake, cond, t, aug_fake)
        loss = losses.discriminator_loss(real_logits, fake_logits)
        total = loss
        if do_r1:
            r1 = losses.r1_penalty(real_logits, real).mean()
            total = loss + r1 * (tc.r1_gamma / 2 * tc.r1_every)
            sums[R1] += r1.detach()
            sums[R1_N] += 1
        self.opt_d.zero_grad(set_to_none=True)
        total.backward()
        self.opt_d.step()
        sums[D_LOSS] += loss.detach()
        sums[D_REAL] += real_logits.detach().mean()
        sums[D_FAKE] += fake_logits.detach().mean()
        return total.detach()

    def _g_step(self, x0: torch.Tensor, gens: list[torch.Generator], sums: torch.Tensor) -> torch.Tensor:
        tc = self.cfg.train
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        _, fake, cond, t = self._pairs(x0, gens, update_w_avg=False)
        loss = losses.generator_loss(self._logits(fake, cond, t, diffaug.draw(tc.policy, gens, self.cfg.data.image_size)))
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        sums[G_LOSS] += loss.detach()
        return loss.detach()

    # -- the shared step loop (difflab.train.steploop) -----------------------------------------------------------
    log_sums = 7

    def loop_description(self) -> str:
        return f"training {self.cfg.kind.value}"

    def train_modules(self) -> list[torch.nn.Module]:
        return [self.G, self.D]

    def ema_source(self) -> torch.nn.Module:
        return self.G

    def train_step(self, sums: torch.Tensor) -> torch.Tensor:
        x0, gens = self._batch()
        d_loss = self._d_step(x0, gens, sums)
        g_loss = self._g_step(x0, gens, sums)
        return torch.isfinite(d_loss) & torch.isfinite(g_loss)

    def log_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"d": f"{record['loss_d']:.3f}", "g": f"{record['loss_g']:.3f}"}

    def after_log(self, record: dict[str, Any]) -> None:
        self._check_collapse(record)

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until max_steps, the minutes budget, ``stop_at`` (tests) or a signal; then save."""
        return self.run_loop(stop_at)

    def check_finite(self) -> None:
        bad = int(self.first_bad)
        if bad:
            raise TrainingDiverged(f"GAN training diverged at step {bad}: the discriminator or generator loss is NaN or "
                                   f"infinite; nothing after it was saved, {self.last_good()} (lower train.lr_g / "
                                   "train.lr_d, or raise train.r1_gamma)")

    def _check_collapse(self, record: dict[str, Any]) -> None:
        tc = self.cfg.train
        if not tc.collapse_g_loss:
            return
        self.collapse_count = self.collapse_count + 1 if record["loss_g"] > tc.collapse_g_loss else 0
        if self.collapse_count >= tc.collapse_logs:
            raise TrainingCollapsed(
                f"the discriminator collapsed at step {self.step}: the generator's loss stayed above "
                f"train.collapse_g_loss={tc.collapse_g_loss:g} for {self.collapse_count} log intervals (now "
                f"{record['loss_g']:.2f}; D(real) {record['d_real']:+.2f}, D(fake) {record['d_fake']:+.2f}), so G gets "
                f"no useful gradient; stopped without saving, {self.last_good()} (try a higher train.r1_gamma, "
                "train.diffaug=color,translation,cutout or lower learning rates; train.collapse_g_loss=0 turns this check off)")

    def write_log(self, sums: torch.Tensor, images_per_s: float) -> dict[str, Any]:
        s = sums.cpu().tolist()
        n = max(s[STEPS], 1.0)
        record = {
            "step": self.step, "images_seen": self.images_seen, "loss_d": s[D_LOSS] / n, "loss_g": s[G_LOSS] / n,
            "r1": s[R1] / s[R1_N] if s[R1_N] else None, "d_real": s[D_REAL] / n, "d_fake": s[D_FAKE] / n,
            "images_per_s": images_per_s, "time": time.time(),
        }
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    # -- outputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self) -> None:
        """A grid from fixed seeds with the EMA generator, so grids of successive steps compare."""
        n = self.cfg.train.sample_grid_size
        if not n:
            return
        imgs = generate((self.ema.model, self.cfg), range(n), seed=self.cfg.train.seed).clamp(-1, 1)
        out = self.run_dir / "samples"
        save_grid(imgs, out / f"step-{self.step:07d}.png", scale=2)
        save_grid(imgs, out / "latest.png", scale=2)

    def save(self) -> None:
        """An atomic checkpoint of G, its EMA, D, both optimisers and the data position; refuses
        non-finite weights (the previous checkpoint then stays the latest)."""
        for name, module in (("generator", self.G), ("discriminator", self.D), ("EMA generator", self.ema.model)):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise TrainingDiverged(f"GAN training diverged by step {self.step}: the {name}'s weights are not finite; "
                                       f"nothing was saved, {self.last_good()}")
        train_state = {}
        metas = {}
        for name, opt in (("optim_g", self.opt_g), ("optim_d", self.opt_d)):
            tensors, metas[name] = optimizer_to_tensors(opt)
            train_state.update({f"{name}.{k}": v for k, v in tensors.items()})
        state = {"step": self.step, "images_seen": self.images_seen, "epoch": self.epoch, "pos": self.pos,
                 "elapsed_seconds": self.elapsed, "collapse_count": self.collapse_count, "kind": self.cfg.kind.value,
                 **metas}
        save_checkpoint(self.run_dir, self.step,
                        {"model": self.G.state_dict(), "ema": self.ema.model.state_dict(),
                         "discriminator": self.D.state_dict(), "train_state": train_state},
                        state, self.cfg.train.keep_checkpoints)

    def _restore(self) -> None:
        """Continue from the newest checkpoint that loads (a damaged one is named in a warning and set
        aside, :func:`~difflab.train.checkpoint.load_newest_good`)."""
        if load_newest_good(self.run_dir, self._load_state) is None:
            raise CheckpointError(f"--resume: run {self.run_dir} has no checkpoint yet")

    def _load_state(self, ckpt: Checkpoint) -> None:
        config = self.run_dir / CONFIG
        for name, module in (("model", self.G), ("ema", self.ema.model), ("discriminator", self.D)):
            load_weights(module, ckpt.tensors(name), ckpt.path / f"{name}.safetensors", config)
        ts, st = ckpt.tensors("train_state"), ckpt.state
        for name, opt in (("optim_g", self.opt_g), ("optim_d", self.opt_d)):
            prefix = name + "."
            optimizer_from_tensors(opt, {k[len(prefix):]: v for k, v in ts.items() if k.startswith(prefix)}, st[name])
        tc = self.cfg.train  # the config's learning rates and betas, not the saved ones: --resume --lr changes them
        for opt, lr in ((self.opt_g, tc.lr_g), (self.opt_d, tc.lr_d)):
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (tc.adam_beta1, tc.adam_beta2)
        self.step, self.images_seen, self.epoch, self.pos = st["step"], st["images_seen"], st["epoch"], st["pos"]
        self.elapsed, self.collapse_count = st["elapsed_seconds"], st.get("collapse_count", 0)
