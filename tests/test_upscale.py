"""Super-resolution: the conditioning image reaches the network, training pairs are what they claim,
a network that predicts nothing leaves the bicubic path, and the commands (train --task upscale,
upscale, sample --upscale-run) work end to end with one-line errors for wrong runs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import RunConfig, UpscaleConfig, resolve_config
from difflab.denoiser import Denoiser
from difflab.edit.upscale import measure_scale, resize, training_pair, upscale_batches
from difflab.errors import ConfigError, DifflabError
from difflab.models.unet import UNet, UNetConfig
from difflab.samplers import SamplerConfig
from difflab.schedule import NoiseSchedule

SMALL = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                   head_channels=16, norm_groups=8, cond_channels=3)


def test_the_low_resolution_image_reaches_the_network():
    torch.manual_seed(0)
    net = UNet(SMALL).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a fresh network outputs zeros whatever it sees
    x = torch.randn(2, 3, 16, 16)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out_a, out_b = net(x, 10, lowres=a), net(x, 10, lowres=b)
        assert not torch.allclose(out_a, out_b, atol=1e-4)
        torch.testing.assert_close(net(x[:1], 10, lowres=a[:1]), out_a[:1], atol=1e-5, rtol=1e-5)
        b[1] = a[1]
        assert torch.allclose(net(x, 10, lowres=b)[1], out_a[1], atol=1e-6)  # per image
    with pytest.raises(DifflabError, match=r"needs lowres of shape \(2, 3, 16, 16\)"):
        net(x, 10)
    with pytest.raises(DifflabError, match="takes no conditioning image"):
        UNet(UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), head_channels=16, norm_groups=8))(x, 1, lowres=a)


def test_training_pairs_are_residuals_of_the_bicubic_path():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    target, up = training_pair(x, UpscaleConfig(from_size=8, scale=4.0), g)
    low = torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    torch.testing.assert_close(up, resize(low, 16))
    torch.testing.assert_close(target / 4 + up, x)
    same, _ = training_pair(x, UpscaleConfig(from_size=8, residual=False), g)
    assert torch.equal(same, x)
    noisy_target, noisy_up = training_pair(x, UpscaleConfig(from_size=8, noise=0.5, scale=1.0), torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy_up, up) and torch.allclose(noisy_target + noisy_up, x, atol=1e-6)
    constant = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(training_pair(constant, UpscaleConfig(from_size=8, scale=1.0), g)[1], constant, atol=1e-6)  # flat stays flat
    with pytest.raises(ConfigError, match="upscale.scale is 0"):
        training_pair(x, UpscaleConfig(from_size=8), g)


def test_the_residual_scale_gives_the_residuals_sigma_data():
    """measure_scale: sigma_data / std(image - bicubic path); the scaled targets then have std sigma_data."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(64, 3, 16, 16, generator=g) * 2 - 1) * 0.5
    up = resize(resize(x, 8), 16)
    scale = measure_scale(x, 8, 0.5)
    assert scale == pytest.approx(0.5 / float((x - up).std()), rel=1e-3)  # three significant digits
    target, _ = training_pair(x, UpscaleConfig(from_size=8, scale=scale), g)
    assert float(target.std()) == pytest.approx(0.5, rel=1e-3)
    assert measure_scale(x * 2, 8, 0.5) == pytest.approx(scale / 2, rel=2e-3)  # twice the detail, half the scale
    with pytest.raises(ConfigError, match="no detail above 8 px"):
        measure_scale(torch.full((4, 3, 16, 16), 0.3), 8, 0.5)  # flat images: the bicubic path is exact


def test_a_network_that_predicts_nothing_leaves_the_bicubic_upsampling():
    """x0-prediction with a fresh (zero-output) network: the residual is 0 at every step, so the
    upscaled images are exactly the bicubic ones, for any sampler."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    den = Denoiser(UNet(SMALL).eval(), schedule, "x0")
    low = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for cfg in (SamplerConfig(sampler="ddim", steps=5, eta=1.0), SamplerConfig(sampler="dpmpp-2m-sde", steps=4)):
        out = torch.cat([b for _, b in upscale_batches(den, low, UpscaleConfig(from_size=8, scale=4.0), 16, cfg, progress=False)])
        torch.testing.assert_close(out, resize(low, 16))
    with pytest.raises(ConfigError, match="takes 8x8 images"):
        next(upscale_batches(den, torch.zeros(1, 3, 16, 16), UpscaleConfig(from_size=8, scale=4.0), 16, cfg, progress=False))
    with pytest.raises(ConfigError, match="upscale.scale 0: it was never trained"):
        next(upscale_batches(den, low, UpscaleConfig(from_size=8), 16, cfg, progress=False))


def test_the_sampled_residual_is_divided_by_the_scale():
    """A network whose x0 output is a constant c: the upscaled image is the bicubic path + c / scale."""
    class Constant(torch.nn.Module):
        def forward(self, x, t, lowres=None, **kw):
            return torch.full_like(x, 0.4)
    den = Denoiser(Constant(), NoiseSchedule.from_name("linear", 1000), "x0")
    low = torch.zeros(2, 3, 8, 8)
    cfg = SamplerConfig(sampler="ddim", steps=4, eta=0.0)
    out = torch.cat([b for _, b in upscale_batches(den, low, UpscaleConfig(from_size=8, scale=4.0), 16, cfg, progress=False)])
    torch.testing.assert_close(out, torch.full_like(out, 0.1))


def test_upscale_config_is_checked_and_round_trips():
    cfg = resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16, "upscale.from_size": 8})
    assert cfg.model.cond_channels == 3 and cfg.upscale.from_size == 8 and cfg.upscale.residual and cfg.upscale.scale == 0
    assert cfg.sampler.eta == 1.0  # super-resolution samples stochastically by default
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16}).model.cond_channels == 0
    with pytest.raises(ConfigError, match="--from 16 must be smaller than --image-size 16"):
        resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16, "upscale.from_size": 16})
    with pytest.raises(ConfigError, match=r"upscale.noise must be a number in \[0, 1\]"):
        UpscaleConfig(from_size=8, noise=2.0)
    with pytest.raises(ConfigError, match=r"upscale.scale must be a finite number >= 0"):
        UpscaleConfig(from_size=8, scale=float("inf"))


def test_a_run_saved_before_the_residual_scale_loads_unscaled(tmp_path):
    cfg = resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16, "upscale.from_size": 8})
    raw = json.loads(cfg.to_json())
    del raw["upscale"]["scale"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert RunConfig.load(tmp_path / "config.json").upscale.scale == 1.0


TINY = ["--preset", "tiny", "--batch-size", "4", "--max-steps", "2", "--no-progress", "train.sample_every=2",
        "train.sample_grid_size=4", "train.precision=fp32"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    for k in range(8):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"f{k}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, faces):
    root = tmp_path_factory.mktemp("sr-runs")
    assert main(["train", "--data", str(faces), "--image-size", "16", "--task", "upscale", "--from", "8",
                 "--out", str(root / "sr"), *TINY]) == 0
    assert main(["train", "--data", str(faces), "--image-size", "8", "--out", str(root / "base"), *TINY]) == 0
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_upscale_and_cascade_end_to_end(tmp_path, capsys, runs, faces):
    cfg = json.loads((runs / "sr" / "config.json").read_text())
    assert cfg["upscale"]["from_size"] == 8 and cfg["model"]["cond_channels"] == 3
    from difflab.data import load_dataset, to_float
    images = to_float(load_dataset(str(faces), 16, None, progress=False).images)
    assert cfg["upscale"]["scale"] == measure_scale(images, 8, 0.5)  # measured when training started, stored
    assert (runs / "sr" / "samples" / "latest.png").is_file()
    code, out, err = _run(capsys, "upscale", "--run", runs / "sr", "--images", faces, "--steps", "3", "--out", tmp_path / "up",
                          "--grid", tmp_path / "up.png", "--no-progress")
    assert code == 0, err
    assert "note: resized 8 of 8 input image(s) to the run's 8x8" in out
    names = sorted(p.name for p in (tmp_path / "up").iterdir())
    assert names == [f"f{k}.png" for k in range(8)] and Image.open(tmp_path / "up" / "f0.png").size == (16, 16)
    code, out, err = _run(capsys, "sample", "--run", runs / "base", "--upscale-run", runs / "sr", "-n", "3", "--steps", "3",
                          "--upscale-steps", "3", "--format", "png", "--out", tmp_path / "cascade", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "cascade").iterdir()) == ["1.png", "2.png", "3.png"]
    assert Image.open(tmp_path / "cascade" / "1.png").size == (16, 16)
    rec = json.loads((tmp_path / "cascade.sampling.json").read_text())
    assert rec["upscale"]["from_size"] == 8 and rec["upscale"]["sampler"]["steps"] == 3
    code, _, err = _run(capsys, "sample", "--run", runs / "base", "--upscale-run", runs / "sr", "-n", "3", "--steps", "3",
                        "--upscale-steps", "3", "--format", "png", "--out", tmp_path / "c1", "--batch-size", "1", "--no-progress")
    assert code == 0, err
    for k in (1, 3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "cascade" / f"{k}.png")), np.asarray(Image.open(tmp_path / "c1" / f"{k}.png")))


@pytest.mark.parametrize("argv, message", [
    (["sample", "--run", "{sr}"], "is a super-resolution run (from 8 px): use difflab upscale"),
    (["upscale", "--run", "{base}", "--images", "{faces}"], "is not a super-resolution run"),
    (["sample", "--run", "{sr}", "--upscale-run", "{sr}"], "is a super-resolution run"),
    (["sample", "--run", "{base}", "--upscale-run", "{base}"], "--upscale-run {base} is not a super-resolution run"),
    (["train", "--data", "{faces}", "--task", "upscale", "--out", "{tmp}/x"], "--task upscale needs --from SIZE"),
    (["train", "--data", "{faces}", "--from", "8", "--out", "{tmp}/x"], "--from is for --task upscale"),
])
def test_wrong_runs_are_one_line_errors(tmp_path, capsys, runs, faces, argv, message):
    fill = {"{sr}": str(runs / "sr"), "{base}": str(runs / "base"), "{faces}": str(faces), "{tmp}": str(tmp_path)}

    def sub(text):
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    code, _, err = _run(capsys, *[sub(a) for a in argv], "--no-progress")
    assert code == 2 and err.count("\n") == 1 and sub(message) in err, err


def test_cascade_refuses_a_base_of_another_size(tmp_path, capsys, runs, faces):
    assert main(["train", "--data", str(faces), "--image-size", "16", "--out", str(tmp_path / "b16"), *TINY]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "sample", "--run", tmp_path / "b16", "--upscale-run", runs / "sr", "--no-progress")
    assert code == 2 and "upscales 3-channel 8 px images, but --run" in err and "makes 3-channel 16 px images" in err
