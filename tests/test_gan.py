"""The GANs (difflab.gan): closed-form checks of the modulated convolution, R1 and the DDGAN posterior
step; DiffAugment; per-image seeds; exact resume; divergence handling; the CLI end to end."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difflab.cli import main
from difflab.data.dataset import ImageData
from difflab.errors import DifflabError
from difflab.gan import ddgan, diffaug, losses
from difflab.gan.config import GANConfig, GANKind, GANNetConfig, resolve_gan_config
from difflab.gan.sample import LoadedGAN, build_networks, generate
from difflab.gan.stylegan import Discriminator, ModulatedConv2d, StyleGenerator, modulated_conv2d
from difflab.gan.trainer import GANTrainer, TrainingCollapsed
from difflab.schedule import NoiseSchedule, ScheduleConfig
from difflab.train import checkpoint as ckpt_mod
from difflab.train.loop import TrainingDiverged

TINY_NET = ["net.z_dim=16", "net.w_dim=16", "net.mapping_layers=2", "net.width=8", "net.max_width=16"]


def tiny_cfg(kind="stylegan", *overrides, size=16):
    return resolve_gan_config(
        kind=kind, flags={"data.source": "synthetic", "data.image_size": size, "data.channels": 3},
        overrides=[*TINY_NET, "train.batch_size=4", "train.max_steps=6", "train.checkpoint_every=2", "train.log_every=2",
                   "train.r1_every=2", "train.sample_every=0", "train.ema_halflife_images=20", "data.augment.hflip=true",
                   *overrides])


def synthetic(n=12, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), None, "synthetic", 0)


def weights(run_dir):
    return {name: ckpt_mod.load_tensors(run_dir / "checkpoints" / json.loads((run_dir / "latest.json").read_text())[
        "checkpoint"].split("/")[-1] / f"{name}.safetensors") for name in ("model", "ema", "discriminator")}


# -- closed forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demodulated_convolution_keeps_unit_variance_per_output_channel(seed):
    """Unit-variance i.i.d. input, random weights (of random scale per output channel) and random
    positive styles: each output channel has variance 1 (StyleGAN2 eq. 3), where the plain modulated
    convolution does not; and the unfused computation equals the per-image (grouped) definition."""
    g = torch.Generator().manual_seed(seed)
    cin, cout, b = 16, 8, 64
    weight = torch.randn(cout, cin, 3, 3, generator=g) * torch.rand(cout, 1, 1, 1, generator=g).mul(3).add(0.2)
    styles = torch.randn(b, cin, generator=g).exp()
    x = torch.randn(b, cin, 20, 20, generator=g)
    out = modulated_conv2d(x, weight, styles)[:, :, 1:-1, 1:-1]  # interior pixels: no zero padding in view
    var = out.var(dim=(0, 2, 3))
    assert torch.allclose(var, torch.ones(cout), atol=0.08), var
    plain = modulated_conv2d(x, weight, styles, demodulate=False)[:, :, 1:-1, 1:-1].var(dim=(0, 2, 3))
    assert not torch.allclose(plain, torch.ones(cout), atol=0.5)
    # the definition: per image, w'_oi = s_i w_oi / sqrt(sum_ik (s_i w_oik)^2)
    w = weight[None] * styles[:, None, :, None, None]
    w = w / w.square().sum(dim=(2, 3, 4), keepdim=True).add(1e-8).sqrt()
    grouped = F.conv2d(x.reshape(1, b * cin, 20, 20), w.reshape(b * cout, cin, 3, 3), padding=1, groups=b)
    assert torch.allclose(modulated_conv2d(x, weight, styles), grouped.reshape(b, cout, 20, 20), atol=1e-5)
    layer = ModulatedConv2d(cin, cout, 3, w_dim=4)  # the layer (affine styles, equalised weights) too
    with torch.no_grad():
        y = layer(x, torch.randn(b, 4, generator=g))[:, :, 1:-1, 1:-1]
    assert torch.allclose(y.var(dim=(0, 2, 3)), torch.ones(cout), atol=0.08)


def test_r1_penalty_matches_finite_differences():
    """R1 = ||d sum(D(x)) / dx_i||^2 per example, against central differences of the real
    discriminator (float64, minibatch stddev over pairs so the cross terms count); and it is
    differentiable with respect to D's weights."""
    torch.manual_seed(0)
    D = Discriminator(GANNetConfig(width=4, max_width=8, mbstd_group=2), 8, 3).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    penalty = losses.r1_penalty(D(x), x)
    h, flat = 1e-6, x.detach().clone().reshape(-1)
    grad = torch.empty_like(flat)
    with torch.no_grad():
        for i in range(len(flat)):
            up, down = flat.clone(), flat.clone()
            up[i] += h
            down[i] -= h
            grad[i] = (D(up.reshape(x.shape)).sum() - D(down.reshape(x.shape)).sum()) / (2 * h)
    expected = grad.reshape(4, -1).square().sum(1)
    assert torch.allclose(penalty, expected, rtol=1e-6), (penalty, expected)
    penalty.sum().backward()
    assert D.from_rgb.weight.grad is not None and D.from_rgb.weight.grad.abs().sum() > 0  # (biases of the last layer: none)
    # the losses themselves: the non-saturating logistic loss at logits 0 is log 2 per term
    zero = torch.zeros(3)
    assert losses.discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert losses.generator_loss(zero).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("t", [0, 1, 2, 3])
def test_ddgan_step_with_the_true_x0_samples_the_schedules_posterior(t):
    """A generator that returns the true x0: the DDGAN step's x_{t-1} has the mean and variance of
    q(x_{t-1} | x_t, x0) from NoiseSchedule, which also match Bayes' rule written out here from the
    schedule's betas; at t = 0 the step returns x0 exactly. A real training pair has the right marginal."""
    sched = NoiseSchedule(ScheduleConfig(kind="cosine", timesteps=4))
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    x_t = sched.q_sample(x0, torch.tensor([t]), torch.randn(1, 3, 4, 4, generator=g))
    n = 40_000
    ts = torch.full((n,), t)
    calls = []

    def true_x0(x, tt, z):
        calls.append(int(tt[0]))
        return x0.expand_as(x)

    xs = x_t.expand(n, -1, -1, -1)
    out = ddgan.reverse_step(true_x0, sched, xs, ts, torch.randn(n, 8, generator=g), torch.randn(n, 3, 4, 4, generator=g))
    assert calls == [t]
    mean = sched.posterior_mean_coef1[t] * x0.double() + sched.posterior_mean_coef2[t] * x_t.double()
    var = float(sched.posterior_variance[t])
    # the same posterior from Bayes' rule: q(x_t | x_{t-1}) q(x_{t-1} | x0)
    abar_prev = float(sched.alphas_cumprod_prev[t])
    beta, alpha = float(sched.betas[t]), float(sched.alphas[t])
    if t > 0:
        precision = 1 / (1 - abar_prev) + alpha / beta
        bayes_mean = (abar_prev**0.5 * x0.double() / (1 - abar_prev) + alpha**0.5 * x_t.double() / beta) / precision
        assert var == pytest.approx(1 / precision, rel=1e-9)
        assert torch.allclose(mean, bayes_mean, atol=1e-9)
        se = math.sqrt(var / n)
        assert (out.double().mean(0) - mean[0]).abs().max() < 5 * se
        assert out.double().var(0).mean().item() == pytest.approx(var, rel=0.02)
    else:
        assert var == 0 and torch.allclose(out, x0.expand_as(out), atol=1e-6)
    # a real pair (x_{t-1}, x_t) ~ q(. | x0): x_{t-1}'s marginal is q(x_{t-1} | x0)
    prev, _ = ddgan.training_pairs(sched, x0.expand(n, -1, -1, -1), ts, torch.randn(n, 3, 4, 4, generator=g),
                                   torch.randn(n, 3, 4, 4, generator=g))
    if t > 0:
        assert (prev.double().mean(0) - abar_prev**0.5 * x0.double()[0]).abs().max() < 5 * math.sqrt((1 - abar_prev) / n)
        assert prev.double().var(0).mean().item() == pytest.approx(1 - abar_prev, rel=0.02)
    else:
        assert torch.equal(prev, x0.expand_as(prev))


@pytest.mark.parametrize("steps", [2, 4])
def test_ddgan_sampling_makes_exactly_t_network_calls(steps):
    cfg = tiny_cfg("ddgan", f"schedule.timesteps={steps}")
    G, _ = build_networks(cfg)
    seen = []
    forward = G.forward

    def counted(x, t, z):
        seen.append(t.tolist())
        return forward(x, t, z)

    G.forward = counted
    imgs = generate((G, cfg), range(3), seed=0)
    assert imgs.shape == (3, 3, 16, 16) and torch.isfinite(imgs).all()
    assert seen == [[k] * 3 for k in range(steps - 1, -1, -1)]
    parts = torch.cat([generate((G, cfg), range(0, 1), seed=0), generate((G, cfg), range(1, 3), seed=0)])
    assert torch.allclose(imgs, parts, atol=1e-5)  # each image from its own seed, whatever the batch



@pytest.mark.parametrize("kind", ["stylegan", "ddgan"])
def test_bf16_sampling_autocasts_the_generator_calls_alone(kind):
    """--precision bf16: every generator call runs under bf16 autocast, DDGAN's posterior steps do not
    (they see float32 x0_hat), and the images stay float32 and close to the fp32 ones."""
    cfg = tiny_cfg(kind, "schedule.timesteps=2")
    G, _ = build_networks(cfg)
    G.eval().requires_grad_(False)
    dtypes = []
    forward = G.forward

    def recorded(*args, **kwargs):
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return forward(*args, **kwargs)

    G.forward = recorded
    real_step = ddgan.posterior_step
    seen_x0 = []

    def step(schedule, x0, x_t, t, noise):
        seen_x0.append((x0.dtype, torch.is_autocast_enabled("cpu")))
        return real_step(schedule, x0, x_t, t, noise)

    ddgan.posterior_step = step
    try:
        psi = 0.7 if kind == "stylegan" else 1.0  # truncation mixes the fp32 w_avg with bf16 styles
        full = generate((G, cfg), range(3), seed=0, truncation=psi)
        half = generate(LoadedGAN(Path("."), cfg, G, None, 0, torch.bfloat16), range(3), seed=0, truncation=psi)
    finally:
        ddgan.posterior_step = real_step
    calls = 2 if kind == "ddgan" else 1
    assert dtypes == [torch.float32] * calls + [torch.bfloat16] * calls
    if kind == "ddgan":
        assert seen_x0 == [(torch.float32, False)] * 4
    assert half.dtype == torch.float32 and not torch.equal(full, half)
    assert (full - half).abs().mean() < 0.05  # bf16 keeps ~3 significant digits

# -- augmentation, generators, per-image seeds ------------------------------------------------------
def test_diffaugment_is_differentiable_seeded_and_does_what_it_says():
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    params = diffaug.draw(("color", "translation", "cutout"), gens, 16)
    again = diffaug.draw(("color", "translation", "cutout"), [torch.Generator().manual_seed(s) for s in range(4)], 16)
    assert all(torch.equal(params[k], again[k]) for k in params) and set(params) == {"color", "shift", "cutout"}
    x = torch.randn(4, 6, 16, 16, requires_grad=True)
    y = diffaug.apply(x, params, groups=2)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert diffaug.apply(x, {}) is x
    # translation: a dot moves by the shift (rows, columns); zero fill
    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 5, 7] = 1
    moved = diffaug.apply(dot, {"shift": torch.tensor([[2, -1]])})
    assert moved[0, 0, 7, 6] == 1 and moved.sum() == 1
    # cutout: a square of half the size is zeroed, the same one in both images of a pair
    ones = torch.ones(1, 6, 16, 16)
    cut = diffaug.apply(ones, {"cutout": torch.tensor([[8, 8]])}, groups=2)
    assert (cut == 0).sum() == 6 * 8 * 8 and torch.equal(cut[:, :3], cut[:, 3:]) and cut[0, 0, 4, 4] == 0
    # a shared shift for the pair
    pair = diffaug.apply(torch.cat([dot, dot], 1), {"shift": torch.tensor([[1, 1]])}, groups=2)
    assert torch.equal(pair[:, 0], pair[:, 1])


def test_stylegan_images_depend_on_their_seed_alone_and_truncation_and_mixing_work():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    G, D = build_networks(cfg)
    assert isinstance(G, StyleGenerator) and G.num_ws == 2 * 4 - 2
    whole = generate((G, cfg), range(6), seed=3)
    parts = torch.cat([generate((G, cfg), range(0, 2), seed=3), generate((G, cfg), range(2, 6), seed=3)])
    assert whole.shape == (6, 3, 16, 16) and torch.allclose(whole, parts, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])
    # psi = 0: every w is w_avg; with the noise inputs' strengths at their initial 0 the images coincide
    flat = generate((G, cfg), range(3), seed=3, truncation=0.0)
    assert torch.allclose(flat[0], flat[1], atol=1e-5) and torch.allclose(flat[0], flat[2], atol=1e-5)
    gens = [torch.Generator().manual_seed(s) for s in range(64)]
    lat = G.draw_latents(gens, mixing=0.5)
    cut = lat["mix_cutoff"]
    assert ((cut >= 1) & (cut <= G.num_ws)).all() and 10 < (cut < G.num_ws).sum() < 54
    assert D(whole).shape == (6,)


# -- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stylegan", "ddgan"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, kind):
    """Stopped at step 3 (between checkpoints; R1 every 2 steps, style mixing, DiffAugment, hflip on)
    and resumed to 6: G, its EMA and D equal the uninterrupted run's bit for bit, and so does the log."""
    cfg, data = tiny_cfg(kind, "train.diffaug=color,translation,cutout"), synthetic()  # (ddgan's default: none)
    GANTrainer(cfg, tmp_path / "straight", data=data, progress=False).run()
    GANTrainer(cfg, tmp_path / "split", data=data, progress=False).run(stop_at=3)
    GANTrainer(cfg, tmp_path / "split", data=data, progress=False, resume=True).run()
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    log = lambda run: {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}  # noqa: E731
    straight, split = log(tmp_path / "straight"), log(tmp_path / "split")
    assert straight[6]["loss_d"] == split[6]["loss_d"] and straight[6]["loss_g"] == split[6]["loss_g"]
    assert straight[6]["r1"] is not None and all(math.isfinite(r["loss_g"]) for r in straight.values())
    saved = GANConfig.load(tmp_path / "straight" / "config.json")
    assert saved == cfg and json.loads((tmp_path / "straight" / "config.json").read_text())["family"] == "gan"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """As for diffusion runs: the truncated newest checkpoint is named in one warning and set aside, the
    previous one resumes, and the run ends equal to the uninterrupted one."""
    from difflab.errors import DifflabWarning

    cfg, data = tiny_cfg("stylegan", "train.keep_checkpoints=5"), synthetic()
    GANTrainer(cfg, tmp_path / "straight", data=data, progress=False).run()
    ckpts = sorted((tmp_path / "straight" / "checkpoints").iterdir())
    assert len(ckpts) >= 2
    newest = ckpts[-1] / "discriminator.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(DifflabWarning, match="discriminator.safetensors is damaged.*falling back"):
        trainer = GANTrainer(cfg, tmp_path / "straight", data=data, progress=False, resume=True)
    assert trainer.step == json.loads((ckpts[-2] / "state.json").read_text())["step"]
    assert (ckpts[-1].parent / (ckpts[-1].name + ".damaged")).is_dir()


def test_a_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A NaN generator loss at step 4 (checkpoints every 3, logs every 2): nothing of the broken state
    is logged or saved, the step-3 checkpoint stays the latest with finite weights, one-line error."""
    trainer = GANTrainer(tiny_cfg("stylegan", "train.checkpoint_every=3"), tmp_path / "run", data=synthetic(), progress=False)
    real = losses.generator_loss
    monkeypatch.setattr(losses, "generator_loss", lambda logits: real(logits) * (float("nan") if trainer.step == 3 else 1))
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    msg = str(err.value)
    assert "diverged at step 4" in msg and "last checkpoint (step 3)" in msg and "\n" not in msg
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3
    for tensors in weights(tmp_path / "run").values():
        assert all(bool(v.isfinite().all()) for v in tensors.values() if v.is_floating_point())
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [2]


def test_a_collapsed_discriminator_stops_training_with_one_line(tmp_path, monkeypatch):
    cfg = tiny_cfg("stylegan", "train.log_every=1", "train.collapse_logs=3", "train.collapse_g_loss=8",
                   "train.checkpoint_every=1")
    trainer = GANTrainer(cfg, tmp_path / "run", data=synthetic(), progress=False)
    real = losses.generator_loss
    monkeypatch.setattr(losses, "generator_loss", lambda logits: real(logits) + (0 if trainer.step < 1 else 12.0))
    with pytest.raises(TrainingCollapsed) as err:
        trainer.run()
    msg = str(err.value)
    assert "collapsed at step 4" in msg and "last checkpoint (step 3)" in msg and "\n" not in msg
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["stylegan", "ddgan"])
def test_cli_trains_resumes_samples_interpolates_and_evaluates(tmp_path, capsys, image_folder, kind, lbp_cascade_path):
    run, images = tmp_path / "run", tmp_path / "submission"
    extra = ["--kind", "ddgan", "--steps", "2"] if kind == "ddgan" else ["--kind", "stylegan"]
    code, out, err = cli(capsys, "gan", "train", "--data", image_folder, "--image-size", 16, "--max-steps", 2, "--out", run,
                         "--batch-size", 4, "--no-progress", *extra, *TINY_NET, "train.sample_every=2",
                         "train.sample_grid_size=4")
    assert code == 0, err
    assert "trained to step 2" in out and (run / "samples" / "latest.png").is_file()
    code, out, err = cli(capsys, "gan", "train", "--out", run, "--resume", "--max-steps", 3, "--lr", 1e-4, "--no-progress")
    assert code == 0 and "trained to step 3" in out, err
    state = json.loads((run / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["optim_g"]["param_groups"][0]["lr"] == state["optim_d"]["param_groups"][0]["lr"] == 1e-4
    assert GANConfig.load(run / "config.json").train.lr_g == 1e-4
    # a requeued job runs its first command line again, with --resume: accepted; a real change is named
    first = ["gan", "train", "--data", image_folder, "--image-size", 16, "--out", run, "--batch-size", 4, "--no-progress",
             *extra, *TINY_NET]
    code, out, err = cli(capsys, *first, "--resume", "--max-steps", 4, "--lr", 1e-4)
    assert code == 0 and "trained to step 4" in out, err
    code, out, err = cli(capsys, *first, "--resume", "--max-steps", 5, "--image-size", 32)
    assert code == 2 and "data.image_size=32 (saved: 16)" in err
    trunc = ["--truncation", "0.7"] if kind == "stylegan" else []
    code, out, err = cli(capsys, "gan", "sample", "--run", run, "-n", 5, "--batch-size", 2, "--out", images,
                         "--no-progress", "--grid", tmp_path / "grid.png", *trunc)
    assert code == 0, err
    assert sorted(p.name for p in images.iterdir()) == [f"{k}.jpg" for k in range(1, 6)]
    record = json.loads((tmp_path / "submission.sampling.json").read_text())
    assert record["n"] == 5 and record["step"] == 4 and record["nfe_per_image"] == (2 if kind == "ddgan" else 1)
    assert record["precision"] == "auto"
    code, out, err = cli(capsys, "gan", "sample", "--run", run, "-n", 2, "--out", tmp_path / "full", "--precision", "fp32",
                         "--no-progress")
    assert code == 0 and json.loads((tmp_path / "full.sampling.json").read_text())["precision"] == "fp32", err
    code, out, err = cli(capsys, "gan", "interpolate", "--run", run, "--out", tmp_path / "strip.png", "--rows", 2,
                         "--frames", 5, "--scale", 1)
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "strip.png").size == (5 * 18 + 2, 2 * 18 + 2)
    code, out, err = cli(capsys, "eval", "--fake", images, "--metrics", "detect", "--detectors", "lbp", "--cascade",
                         lbp_cascade_path, "--json", tmp_path / "scores.json", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "scores.json").read_text())["n_fake"] == 5


def test_cli_bad_input_is_one_line(tmp_path, capsys, image_folder):
    diffusion = tmp_path / "diffusion"
    diffusion.mkdir()
    (diffusion / "config.json").write_text(json.dumps({"model": {}, "preset": "small"}))
    base = ["gan", "train", "--data", image_folder, "--out", tmp_path / "r", "--no-progress"]
    cases = [
        (["gan"], "choose a sub-command"),
        (["gan", "train", "--out", tmp_path / "r"], "--data"),
        ([*base, "--steps", 4], "--steps is the number of denoising steps of --kind ddgan"),
        ([*base, "--image-size", 24], "power of two"),
        ([*base, "train.diffaug=colour"], "unknown operation 'colour'"),
        ([*base, "--kind", "ddgan", "--steps", 40], "1 to 16 steps"),
        ([*base, "--kind", "ddgan", "schedule.kind=linear"], "too few"),
        ([*base, "net.width=0"], "net.width must be a positive integer"),
        (["gan", "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r2", "--no-progress"], "no such data folder"),
        (["gan", "train", "--out", tmp_path / "nothing", "--resume"], "not a difflab run directory"),
        (["gan", "sample", "--run", diffusion], "is a diffusion run, not a GAN run"),
        (["gan", "sample", "--run", tmp_path / "nothing"], "not a difflab run directory"),
        (["gan", "interpolate", "--run", diffusion, "--out", tmp_path / "x.txt"], "must end in .png"),
    ]
    for argv, message in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_presets_parameter_counts_and_config_round_trip():
    """The presets build at 32 and 64 px; the config survives JSON exactly; a GAN config is refused
    as a diffusion config's family and vice versa."""
    counts = {}
    for kind in ("stylegan", "ddgan"):
        for preset in ("small", "default"):
            cfg = resolve_gan_config(kind=kind, preset=preset, flags={"data.source": "x", "data.image_size": 32})
            assert GANConfig.from_dict(json.loads(cfg.to_json())) == cfg
            G, D = build_networks(cfg)
            counts[kind, preset] = sum(p.numel() for p in G.parameters())
    assert counts["stylegan", "small"] < 1.5e6 < counts["stylegan", "default"]
    assert resolve_gan_config(flags={"data.source": "fashion-mnist"}).data.channels == 1
    ddgan_cfg = resolve_gan_config(kind=GANKind.DDGAN, flags={"data.source": "x"})
    assert ddgan_cfg.steps == 4 and ddgan_cfg.train.diffaug == "" and resolve_gan_config().train.policy == diffaug.OPS
    with pytest.raises(DifflabError, match="family"):
        GANConfig(family="diffusion")


def test_diffusion_commands_point_a_gan_run_to_the_gan_commands(tmp_path):
    from difflab.errors import CheckpointError
    from difflab.runs import load_run

    run = tmp_path / "g"
    run.mkdir()
    (run / "config.json").write_text('{"family": "gan", "kind": "stylegan"}')
    with pytest.raises(CheckpointError, match="is a GAN run: sample it with `difflab gan sample"):
        load_run(run)
    from difflab.cli import main

    assert main(["curves", "--run", str(run)]) == 2


def test_cli_resume_auto_starts_then_resumes(tmp_path, capsys, image_folder):
    run = tmp_path / "run"
    line = ["gan", "train", "--data", image_folder, "--image-size", 16, "--out", run, "--batch-size", 4, "--no-progress",
            "--resume", "auto", *TINY_NET]
    code, out, err = cli(capsys, *line, "--max-steps", 2)
    assert code == 0 and "trained to step 2" in out, err
    code, out, err = cli(capsys, *line, "--max-steps", 4)
    assert code == 0 and "trained to step 4" in out, err
