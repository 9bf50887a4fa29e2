"""The KL autoencoder (difflab.autoencoder): config round trip, shapes, the KL's closed form, learning
a toy data set, exact resume, the discriminator path, the report, loading, and the CLI end to end."""
import json

import pytest
import torch

from difflab.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    AutoencoderTrainer,
    PatchDiscriminator,
    kl,
    latent_stats,
    load_autoencoder,
    reconstruct,
    resolve_autoencoder_config,
)
from difflab.autoencoder.config import AENetConfig
from difflab.autoencoder.model import adaptive_weight, hinge_d_loss, hinge_g_loss
from difflab.autoencoder.report import psnr
from difflab.cli import main
from difflab.data.dataset import ImageData
from difflab.errors import CheckpointError, ConfigError
from difflab.train import checkpoint as ckpt_mod

TINY = ["net.width=8", "net.max_width=16", "net.disc_width=8", "train.batch_size=4", "train.holdout=4",
        "train.sample_every=0", "train.log_every=2", "train.checkpoint_every=2", "train.ema_halflife_images=20"]


def ramps(n=64, size=16, seed=0):
    """Smooth toy images: a horizontal or vertical ramp between two random colours."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, 3, 1, 1, generator=g)
    t = torch.linspace(0, 1, size)
    vertical = torch.rand(n, generator=g) < 0.5
    ramp = torch.where(vertical[:, None, None, None], t[None, None, :, None].expand(n, 1, size, size),
                       t[None, None, None, :].expand(n, 1, size, size))
    img = c[:, 0] + (c[:, 1] - c[:, 0]) * ramp
    return ImageData((img * 255).round().to(torch.uint8).contiguous(), None, "toy", 0)


def cfg_for(*overrides, size=16):
    return resolve_autoencoder_config(flags={"data.source": "toy", "data.image_size": size}, overrides=[*TINY, *overrides])


def latest_tensors(run_dir):
    ckpt = ckpt_mod.latest_checkpoint(run_dir)
    return {name: ckpt.tensors(name) for name in ("model", "ema", "train_state")}


# -- config and model -----------------------------------------------------------------------------
def test_config_round_trips_and_checks_keys(tmp_path):
    cfg = cfg_for("net.downsample=8", "net.attention=true", "loss.disc_weight=0.5", "train.precision=fp32",
                  "loss.kl_weight=1e-5")
    assert AutoencoderConfig.from_dict(json.loads(cfg.to_json())) == cfg
    (tmp_path / "config.json").write_text(cfg.to_json())
    loaded = AutoencoderConfig.load(tmp_path / "config.json")
    assert loaded == cfg and loaded.to_json() == cfg.to_json()
    assert AutoencoderConfig().to_dict()["family"] == "autoencoder"
    for bad, key in [("net.downsample=3", "net.downsample"), ("net.width=0", "net.width"),
                     ("loss.kl_weight=-1", "loss.kl_weight"), ("train.precision=fp16", "train.precision"),
                     ("train.holdout=-1", "train.holdout"), ("data.image_size=18", "--image-size 18")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
            cfg_for(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("downsample", [4, 8])
def test_encode_decode_shapes(downsample):
    ae = Autoencoder(AENetConfig(width=8, max_width=16, downsample=downsample, latent_channels=3, attention=True))
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, 32 // downsample, 24 // downsample)
    assert mean.dtype == torch.float32 and float(logvar.min()) >= -30 and float(logvar.max()) <= 20
    assert ae.decode(mean).shape == x.shape
    assert ae.latent_shape(32) == (3, 32 // downsample, 32 // downsample)
    with pytest.raises(ConfigError):
        ae.latent_shape(30)
    assert PatchDiscriminator(8)(x).shape[:2] == (2, 1)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(kl(mean, logvar), expected, atol=1e-5)
    assert torch.equal(kl(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)), torch.zeros(2))


def test_hinge_losses_and_adaptive_weight():
    assert float(hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(3), torch.zeros(3))) == 1.0
    assert float(hinge_g_loss(torch.tensor([1.0, 3.0]))) == -2.0
    w = torch.ones(3, requires_grad=True)
    # d(rec)/dw = 2 (norm 2 sqrt 3), d(gan)/dw = 1 (norm sqrt 3): ratio 2 (up to the 1e-4 guard)
    assert abs(float(adaptive_weight((2 * w).sum(), w.sum(), w)) - 2.0) < 1e-3


# -- training -----------------------------------------------------------------------------------
def test_learns_to_reconstruct_held_out_toy_images(tmp_path, capsys):
    """200 steps on 48 colour ramps: the held-out 16 come back above 18 dB (an untrained or broken
    decoder is near 10 dB); report.json has the latent statistics and the PSNR."""
    cfg = cfg_for("net.width=16", "net.max_width=32", "train.batch_size=16", "train.holdout=16", "train.max_steps=200",
                  "train.lr=1e-3", "train.ema_halflife_images=200", "train.precision=fp32", "train.log_every=50",
                  "train.checkpoint_every=200")
    data = ramps()
    untrained = Autoencoder(cfg.net)
    before = float(psnr(data.images[-16:], reconstruct(untrained, data.images[-16:])).mean())
    result = AutoencoderTrainer(cfg, tmp_path / "run", data=data, progress=False).run()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report == result["report"]
    assert before < 14 and report["psnr"] > 18, (before, report)
    assert report["holdout"] == 16 and report["train_images"] == 48 and report["fid"] is None and report["step"] == 200
    assert len(report["latent_std"]) == len(report["latent_mean"]) == 4 and min(report["latent_std"]) > 0
    assert "held-out PSNR" in capsys.readouterr().out
    ae, loaded_cfg, loaded_report = load_autoencoder(tmp_path / "run")
    assert loaded_cfg == cfg and loaded_report == report and not ae.training
    assert not any(p.requires_grad for p in ae.parameters())
    mean, std = latent_stats(ae, data.images[:48], batch=7)
    assert mean == pytest.approx(report["latent_mean"], abs=1e-5) and std == pytest.approx(report["latent_std"], abs=1e-5)


def test_resume_is_bit_identical(tmp_path):
    """4 steps in one go == 2 steps, then 2 more resumed, with the discriminator from step 1 (augmentation,
    posterior noise, both optimisers, the EMA and the discriminator's weights all carried over)."""
    cfg = cfg_for("train.max_steps=4", "loss.disc_weight=0.5", "loss.disc_start=1", "data.augment.hflip=true")
    data = ramps(12)
    AutoencoderTrainer(cfg, tmp_path / "a", data=data, progress=False).run()
    AutoencoderTrainer(cfg, tmp_path / "b", data=data, progress=False).run(stop_at=2)
    AutoencoderTrainer(cfg, tmp_path / "b", data=data, progress=False, resume=True).run()
    a, b = latest_tensors(tmp_path / "a"), latest_tensors(tmp_path / "b")
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert any(k.startswith("discriminator.") for k in a["train_state"])
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == json.loads((tmp_path / "b" / "report.json").read_text())


def test_discriminator_path_runs_with_a_finite_adaptive_weight(tmp_path):
    cfg = cfg_for("train.max_steps=2", "loss.disc_weight=0.5", "loss.disc_start=0", "train.log_every=1",
                  "train.sample_every=2")
    AutoencoderTrainer(cfg, tmp_path / "run", data=ramps(12), progress=False).run()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for rec in log:
        assert rec["disc_weight"] is not None and 0 < rec["disc_weight"] < float("inf")
        assert rec["loss_d"] is not None and rec["loss_g"] is not None
    assert (tmp_path / "run" / "samples" / "latest.png").is_file()
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()
    cfg_off = cfg_for("train.max_steps=1", "loss.disc_weight=0.5", "loss.disc_start=5", "train.log_every=1")
    AutoencoderTrainer(cfg_off, tmp_path / "off", data=ramps(12), progress=False).run()
    assert json.loads((tmp_path / "off" / "log.jsonl").read_text())["loss_d"] is None


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    from difflab.train.loop import TrainingDiverged

    cfg = cfg_for("train.max_steps=4", "train.lr=1e30")
    with pytest.raises(TrainingDiverged, match=r"diverged (at|by) step \d") as info:
        AutoencoderTrainer(cfg, tmp_path / "run", data=ramps(12), progress=False).run()
    assert "\n" not in str(info.value)


def test_holdout_larger_than_the_data_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.holdout=12 holds out all 12 images"):
        AutoencoderTrainer(cfg_for("train.holdout=12"), tmp_path / "run", data=ramps(12), progress=False)
    assert not (tmp_path / "run").exists()


# -- loading and the command line -------------------------------------------------------------
def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("ramps")
    for i, img in enumerate(ramps(10).images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    return folder


def test_load_autoencoder_refuses_other_runs_in_one_line(tmp_path):
    diffusion = tmp_path / "diffusion"
    diffusion.mkdir()
    (diffusion / "config.json").write_text(json.dumps({"model": {}, "preset": "small"}))
    gan = tmp_path / "gan"
    gan.mkdir()
    (gan / "config.json").write_text(json.dumps({"family": "gan"}))
    for run, message in [(diffusion, "is a diffusion run, not an autoencoder run"),
                         (gan, "is a gan run, not an autoencoder run"),
                         (tmp_path / "nothing", "not a difflab run directory")]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_autoencoder(run)
        assert "\n" not in str(info.value) and str(run) in str(info.value)


def test_cli_trains_resumes_and_reports(tmp_path, capsys, image_folder):
    run = tmp_path / "run"
    line = ["train-autoencoder", "--data", image_folder, "--image-size", 16, "--out", run, "--batch-size", 4,
            "--holdout", 2, "--latent-channels", 3, "--no-progress", "net.width=8", "net.max_width=16"]
    code, out, err = cli(capsys, *line, "--dry-run", "--disc", "--downsample", 8)
    assert code == 0, err
    shown = AutoencoderConfig.from_dict(json.loads(out))
    assert shown.net.downsample == 8 and shown.loss.disc_weight == 0.5 and shown.net.latent_channels == 3
    assert shown.train.holdout == 2 and not run.exists()
    code, out, err = cli(capsys, *line, "--max-steps", 2, "train.sample_every=2")
    assert code == 0, err
    assert "trained to step 2" in out and "held-out PSNR" in out
    assert (run / "samples" / "latest.png").is_file() and (run / "model.safetensors").is_file()
    code, out, err = cli(capsys, *line, "--resume", "--max-steps", 3, "--lr", 1e-4)
    assert code == 0 and "trained to step 3" in out, err
    assert AutoencoderConfig.load(run / "config.json").train.lr == 1e-4
    assert json.loads((run / "report.json").read_text())["step"] == 3
    code, out, err = cli(capsys, *line, "--resume", "--max-steps", 4, "--downsample", 8)
    assert code == 2 and "net.downsample=8 (saved: 4)" in err
    ae, cfg, report = load_autoencoder(run, use_ema=False)
    assert ae.latent_shape(16) == (3, 4, 4) and report["holdout"] == 2


def test_cli_bad_input_is_one_line(tmp_path, capsys, image_folder):
    diffusion = tmp_path / "diffusion"
    diffusion.mkdir()
    (diffusion / "config.json").write_text(json.dumps({"model": {}, "preset": "small"}))
    base = ["train-autoencoder", "--data", image_folder, "--out", tmp_path / "r", "--no-progress", "--image-size", 16]
    cases = [
        ([*base, "--downsample", 3], "invalid choice: 3"),
        (["train-autoencoder", "--data", tmp_path / "nowhere", "--out", tmp_path / "r2", "--no-progress"],
         "no such data folder"),
        (["train-autoencoder", "--out", tmp_path / "r3"], "--data"),
        ([*base, "--image-size", 18], "multiple of --downsample"),
        ([*base, "--holdout", 10, "--max-steps", 1], "holds out all 10 images"),
        ([*base, "net.width=0"], "net.width must be a positive integer"),
        (["train-autoencoder", "--out", diffusion, "--resume"], "is a diffusion run, not an autoencoder run"),
        (["train-autoencoder", "--out", tmp_path / "nothing", "--resume"], "not a difflab run directory"),
    ]
    for argv, message in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()
