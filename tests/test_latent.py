"""Latent diffusion (difflab.latent): the config of a run on an autoencoder's latents, the codec's
normalisation, the data encoded once (both orientations, cached), training, exact resume, and the
sampling path ending in the decoder; the commands that do not take latent runs say so in one line."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import LatentConfig, RunConfig, resolve_config
from difflab.errors import ConfigError

AE_TINY = ["--image-size", "16", "--latent-channels", "4", "--downsample", "4", "--batch-size", "8", "--holdout", "4",
           "--no-progress", "net.width=8", "net.max_width=16", "train.sample_every=0", "train.precision=fp32"]
TINY = ["--preset", "tiny", "--batch-size", "4", "--no-progress", "train.sample_every=2", "train.sample_grid_size=4",
        "train.precision=fp32", "train.checkpoint_every=2"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """16 blobby faces: a coloured disc on a coloured ground (something an autoencoder learns in seconds)."""
    root = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for k in range(16):
        ground, disc = torch.randint(0, 256, (3,), generator=g), torch.randint(0, 256, (3,), generator=g)
        cx, cy = torch.randint(5, 11, (2,), generator=g).tolist()
        inside = ((xx - cx) ** 2 + (yy - cy) ** 2) < 16
        img = torch.where(inside[..., None], disc, ground).to(torch.uint8)
        Image.fromarray(img.numpy()).save(root / f"f{k}.png")
    return root


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, faces):
    root = tmp_path_factory.mktemp("ae")
    assert main(["train-autoencoder", "--data", str(faces), "--out", str(root / "ae"), "--max-steps", "30", *AE_TINY]) == 0
    return root / "ae"


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, faces, ae_run):
    root = tmp_path_factory.mktemp("ldm")
    assert main(["train", "--latent-of", str(ae_run), "--data", str(faces), "--out", str(root / "ldm"), "--max-steps", "4",
                 "data.augment.hflip=true", *TINY]) == 0
    return root / "ldm"


def _latent_flags(**over):
    flags = {"data.source": "faces", "data.image_size": 16, "data.channels": 3, "latent.autoencoder": "/ae", "latent.step": 30,
             "latent.channels": 4, "latent.downsample": 4, "latent.mean": [0.1, 0.0, -0.2, 0.3],
             "latent.std": [1.5, 0.5, 2.0, 1.0]}
    return {**flags, **over}


def test_the_network_of_a_latent_run_is_built_for_the_latents():
    cfg = resolve_config(preset="tiny", flags=_latent_flags())
    assert (cfg.model.image_size, cfg.model.in_channels, cfg.data.image_size) == (4, 4, 16)
    assert cfg.loss.sigma_data == 1.0  # the latents are normalised to unit variance
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg  # save -> load round-trips exactly
    assert cfg.latent.mean == (0.1, 0.0, -0.2, 0.3)
    assert resolve_config(preset="tiny", flags=_latent_flags(), overrides=["loss.sigma_data=0.5"]).loss.sigma_data == 0.5
    plain = resolve_config(preset="tiny", flags={"data.source": "faces", "data.image_size": 16})
    assert not plain.latent.active and plain.model.image_size == 16


def test_a_latent_run_samples_with_ddim_eta_1_at_its_measured_step_count_unless_told():
    from difflab.config import LATENT_DDIM_STEPS

    assert LATENT_DDIM_STEPS == 20
    cfg = resolve_config(recipe="best", flags=_latent_flags())
    assert (cfg.sampler.sampler.value, cfg.sampler.eta, cfg.sampler.steps) == ("ddim", 1.0, 20)
    assert resolve_config(recipe="best", flags={"data.source": "faces", "data.image_size": 32}).sampler.steps == 50
    assert resolve_config(recipe="best", flags=_latent_flags(), overrides=["sampler.steps=50"]).sampler.steps == 50
    assert resolve_config(recipe="best", toml={"sampler": {"steps": 35}}, flags=_latent_flags()).sampler.steps == 35
    eta0 = resolve_config(recipe="best", flags=_latent_flags(), overrides=["sampler.eta=0"]).sampler
    assert (eta0.eta, eta0.steps) == (0.0, 50)  # only DDIM eta 1 was measured
    assert resolve_config(recipe="hw-simple", flags=_latent_flags()).sampler.steps is None  # DDPM: every step


@pytest.mark.parametrize("over, overrides, message", [
    ({"latent.std": [1.0, 1.0, 1.0]}, [], "latent.mean and latent.std need 4 values"),
    ({"latent.std": [1.0, 0.0, 1.0, 1.0]}, [], "latent.std finite and positive"),
    ({}, ["data.augment.rotate_degrees=10"], "only data.augment.hflip"),
    ({"upscale.from_size": 8}, [], "cannot be combined"),
    ({}, ["model.image_size=8"], "needs model.image_size=4"),
    ({}, ["model.in_channels=3"], "latents have 4 channels"),
])
def test_a_latent_config_that_cannot_work_is_one_line(over, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(preset="tiny", flags=_latent_flags(**over), overrides=overrides)
    with pytest.raises(ConfigError, match="latent.channels is 0"):
        LatentConfig(mean=(0.0,), std=(1.0,))


def test_the_codec_normalises_with_the_runs_statistics(ae_run):
    from difflab.autoencoder import load_autoencoder
    from difflab.latent import LatentCodec

    model, cfg, report = load_autoencoder(ae_run)
    assert report["latent_std"] and all(s > 0 for s in report["latent_std"])
    mean, std = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    codec = LatentCodec(model, cfg, mean, std)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        raw, _ = model.encode(x)
        z = codec.encode(x)
        torch.testing.assert_close(z, (raw - mean[:, None, None]) / std[:, None, None])
        torch.testing.assert_close(codec.decode(z), model.decode(raw).clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert z.shape == (3, 4, 4, 4)


def test_the_data_is_encoded_once_in_both_orientations(ae_run, faces, monkeypatch):
    from difflab.autoencoder import load_autoencoder
    from difflab.data import load_dataset, to_float
    from difflab.latent import LatentCodec, encode_images

    model, cfg, report = load_autoencoder(ae_run)
    codec = LatentCodec(model, cfg, torch.tensor(report["latent_mean"]), torch.tensor(report["latent_std"]))
    images = load_dataset(str(faces), 16, None, progress=False).images
    z = encode_images(codec, images, hflip=True, progress=False)
    assert z.shape == (16, 2, 4, 4, 4)
    torch.testing.assert_close(z[:, 0], codec.encode(to_float(images)))
    torch.testing.assert_close(z[:, 1], codec.encode(to_float(images).flip(-1)))
    assert not torch.allclose(z[:, 1], z[:, 0].flip(-1), atol=1e-3)  # a latent's mirror is not the mirror's latent
    one = encode_images(codec, images, hflip=False, progress=False)  # another cache entry: one view
    assert one.shape == (16, 1, 4, 4, 4) and torch.equal(one[:, 0], z[:, 0])
    monkeypatch.setattr(LatentCodec, "encode", lambda self, x: pytest.fail("encoded again instead of the cache"))
    assert torch.equal(encode_images(codec, images, hflip=True, progress=False), z)


def test_latent_run_trains_and_samples_through_the_decoder(latent_run, tmp_path, capsys):
    from difflab.data.dataset import to_uint8
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample

    saved = json.loads((latent_run / "config.json").read_text())
    assert saved["latent"]["channels"] == 4 and saved["model"]["image_size"] == 4
    assert (latent_run / "autoencoder" / "ema.safetensors").is_file()
    assert Image.open(latent_run / "samples" / "latest.png").size[0] > 16  # the preview grid is of decoded images
    code, out, err = _run(capsys, "sample", "--run", latent_run, "-n", 5, "--sampler", "ddim", "--steps", 4, "--eta", 0,
                          "--format", "png", "--batch-size", 2, "--out", tmp_path / "imgs", "--no-progress", "--precision", "fp32")
    assert code == 0, err
    files = sorted((tmp_path / "imgs").glob("*.png"), key=lambda p: int(p.stem))
    assert len(files) == 5 and all(Image.open(f).size == (16, 16) and Image.open(f).mode == "RGB" for f in files)
    record = json.loads((tmp_path / "imgs.sampling.json").read_text())
    assert record["clip"] == "none"  # latents are not clipped to [-1, 1]
    run = load_run(latent_run)
    z = sample(run.denoiser(precision="fp32"), 5, run.image_shape, SamplerConfig(sampler="ddim", steps=4, eta=0.0),
               seed=0, progress=False)
    assert z.shape == (5, 4, 4, 4)
    want = to_uint8(run.to_pixels(z, "fp32"))
    got = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    assert (got.int() - want.int()).abs().max() <= 1  # the written images are the decoded latents


def test_a_latent_run_resumes_exactly_and_samples_without_its_autoencoder_run(tmp_path, faces, ae_run, latent_run, capsys):
    from safetensors.torch import load_file

    ae = tmp_path / "ae"
    shutil.copytree(ae_run, ae)
    args = ["--latent-of", ae, "--data", faces, "data.augment.hflip=true", *TINY]
    assert _run(capsys, "train", "--out", tmp_path / "a", "--max-steps", 4, *args)[0] == 0
    assert _run(capsys, "train", "--out", tmp_path / "b", "--max-steps", 2, *args)[0] == 0
    shutil.rmtree(ae)  # the run carries its autoencoder: resuming and sampling need no other folder
    code, _, err = _run(capsys, "train", "--out", tmp_path / "b", "--resume", "--max-steps", 4, *TINY)
    assert code == 0, err
    for name in ("ema", "model"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = _run(capsys, "sample", "--run", tmp_path / "b", "-n", 2, "--steps", 2, "--out", tmp_path / "s", "--no-progress")
    assert code == 0, err


def test_latent_runs_are_refused_in_one_line_where_they_cannot_work(latent_run, ae_run, faces, tmp_path, capsys):
    code, _, err = _run(capsys, "sample", "--run", latent_run, "-n", 1, "--clip", "clip", "--out", tmp_path / "x", "--no-progress")
    assert code == 2 and "latents have no [-1, 1] range" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "upscale", "--run", latent_run, "--images", faces / "f0.png", "--out", tmp_path / "e",
                        "--no-progress")
    assert code == 2 and "is a latent run" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "train", "--latent-of", ae_run, "--data", faces, "--image-size", 32, "--out", tmp_path / "r",
                        *TINY)
    assert code == 2 and "works at 16 px" in err
    code, _, err = _run(capsys, "train", "--latent-of", latent_run, "--data", faces, "--out", tmp_path / "r", *TINY)
    assert code == 2 and str(latent_run) in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "train", "--latent-of", ae_run, "--data", faces, "--task", "upscale", "--from", "8",
                        "--out", tmp_path / "r", *TINY)
    assert code == 2 and "cannot be combined" in err


def test_a_stale_autoencoder_report_is_refused(tmp_path, ae_run, faces, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(ae_run, ae)
    report = json.loads((ae / "report.json").read_text())
    (ae / "report.json").write_text(json.dumps({**report, "step": report["step"] - 10}))
    code, _, err = _run(capsys, "train", "--latent-of", ae, "--data", faces, "--out", tmp_path / "r", *TINY)
    assert code == 2 and "report.json describes step" in err
    (ae / "report.json").unlink()
    code, _, err = _run(capsys, "train", "--latent-of", ae, "--data", faces, "--out", tmp_path / "r", *TINY)
    assert code == 2 and "no report.json" in err


def test_a_class_conditional_latent_run_samples_each_class_with_guidance(tmp_path, faces, ae_run, capsys):
    for k, f in enumerate(sorted(faces.glob("*.png"))):  # two classes of the same faces, one sub-folder each
        (tmp_path / "data" / ("a" if k % 2 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "data" / ("a" if k % 2 else "b") / f.name)
    code, _, err = _run(capsys, "train", "--latent-of", ae_run, "--data", tmp_path / "data", "--labels", "folders",
                        "--out", tmp_path / "run", "--max-steps", 2, *TINY)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["cond"]["classes"] == [["a", "b"]] and saved["latent"]["channels"] == 4
    code, out, err = _run(capsys, "sample", "--run", tmp_path / "run", "--class", "all", "-n", 2, "--guidance", 3,
                          "--steps", 2, "--format", "png", "--out", tmp_path / "s", "--no-progress")
    assert code == 0, err
    assert sorted(int(p.stem) for p in (tmp_path / "s").glob("*.png")) == [1, 2, 3, 4]
    assert all(Image.open(p).size == (16, 16) for p in (tmp_path / "s").glob("*.png"))


def test_progress_and_animate_show_a_latent_run_through_its_decoder(latent_run, tmp_path, capsys):
    code, _, err = _run(capsys, "progress", "--run", latent_run, "-n", 2, "--steps", 4, "--frames", 3,
                        "--out", tmp_path / "p.png", "--npz", tmp_path / "p.npz", "--no-progress")
    assert code == 0, err
    arrays = np.load(tmp_path / "p.npz")
    assert arrays["x0"].shape[2:] == (3, 16, 16) and arrays["x"].shape[2:] == (3, 16, 16)  # decoded images, not latents
    code, _, err = _run(capsys, "animate", "--run", latent_run, "-n", 2, "--steps", 4, "--frames", 3,
                        "--out", tmp_path / "a.gif", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "a.gif").is_file()


def test_compare_sweeps_samplers_on_a_latent_run_and_writes_the_decoded_images(latent_run, tmp_path, capsys):
    code, _, err = _run(capsys, "compare", "--run", latent_run, "-n", 3, "--samplers", "ddim-4,euler-3", "--batch-size", 2,
                        "--out", tmp_path / "cmp", "--no-progress", "--precision", "fp32")
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["image_shape"] == [3, 16, 16] and [r["sampler"] for r in result["rows"]] == ["ddim-4", "euler-3"]
    code, _, err = _run(capsys, "sample", "--run", latent_run, "-n", 3, "--sampler", "ddim", "--steps", 4, "--eta", 0,
                        "--format", "png", "--out", tmp_path / "imgs", "--no-progress", "--precision", "fp32")
    assert code == 0, err
    for k in (1, 2, 3):  # the same seeds, the same decoder: compare's images are the ones sample writes
        got = np.array(Image.open(tmp_path / "cmp" / "ddim-4" / f"{k}.png"), dtype=np.int16)
        want = np.array(Image.open(tmp_path / "imgs" / f"{k}.png"), dtype=np.int16)
        assert got.shape == (16, 16, 3) and np.abs(got - want).max() <= 1


def _pixels(folder, pattern="*.png"):
    files = sorted(folder.glob(pattern))
    return files, torch.stack([torch.from_numpy(np.array(Image.open(f), dtype=np.int16)).permute(2, 0, 1) for f in files])


def test_sdedit_on_a_latent_run_edits_the_encoded_input_and_decodes(latent_run, faces, tmp_path, capsys):
    from difflab.data.dataset import to_uint8
    from difflab.edit import load_inputs
    from difflab.runs import load_run
    from difflab.samplers import sample_batches

    def sampler_config_of(run):  # the run's own sampler table at the 4 steps the commands ask for
        return dataclasses.replace(run.config.sampler, steps=4)

    common = ["--run", latent_run, "--image", faces / "f0.png", "--steps", 4, "--precision", "fp32", "--no-progress"]
    for batch in (1, 64):  # per-image seeds: the batch size does not change an edit
        code, _, err = _run(capsys, "edit", *common, "-n", 3, "--strength", 0.5, "--batch-size", batch,
                            "--out", tmp_path / f"b{batch}")
        assert code == 0, err
    a, b = sorted((tmp_path / "b1").glob("*.png")), sorted((tmp_path / "b64").glob("*.png"))
    assert [f.name for f in a] == ["f0-1.png", "f0-2.png", "f0-3.png"]
    assert all(Image.open(f).size == (16, 16) and f.read_bytes() == g.read_bytes() for f, g in zip(a, b))
    # strength 0: nothing is noised, so the result is the autoencoder's reconstruction of the input
    code, _, err = _run(capsys, "edit", *common, "-n", 1, "--strength", 0, "--out", tmp_path / "s0")
    assert code == 0, err
    run = load_run(latent_run)
    x = load_inputs(faces / "f0.png", 16, 3).images
    want = to_uint8(run.to_pixels(run.to_latents(x, "fp32"), "fp32")).to(torch.int16)
    assert (_pixels(tmp_path / "s0")[1] - want).abs().max() <= 1
    # strength 0.5: the sampler starts from the encoded input noised half-way, and its latents are decoded
    z = torch.cat([zb for _, zb in sample_batches(run.denoiser(precision="fp32"), 3, run.image_shape,
                                                  sampler_config_of(run), seed=0, progress=False,
                                                  init=run.to_latents(x.expand(3, -1, -1, -1), "fp32"), strength=0.5)])
    want = to_uint8(run.to_pixels(z, "fp32")).to(torch.int16)
    assert (_pixels(tmp_path / "b1")[1] - want).abs().max() <= 1


def test_inpainting_a_latent_run_keeps_the_input_outside_the_mask_exactly(latent_run, faces, tmp_path, capsys):
    from difflab.data.dataset import to_uint8
    from difflab.edit import load_inputs

    mask = np.zeros((16, 16), np.uint8)
    mask[:, :6] = 255  # not on the 4 px latent grid: latent columns 0-1 (pixels 0-7) are regenerated
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, _, err = _run(capsys, "inpaint", "--run", latent_run, "--image", faces / "f3.png", "--mask", tmp_path / "mask.png",
                        "-n", 2, "--steps", 4, "--jump", 1, "--resample", 2, "--precision", "fp32", "--no-progress",
                        "--out", tmp_path / "p", "--grid", tmp_path / "p.png")
    assert code == 0, err
    files, got = _pixels(tmp_path / "p")
    assert [f.name for f in files] == ["f3-1.png", "f3-2.png"] and Image.open(tmp_path / "p.png").size[0] > 16
    x = to_uint8(load_inputs(faces / "f3.png", 16, 3).images).to(torch.int16)
    assert torch.equal(got[..., 6:], x.expand(2, -1, -1, -1)[..., 6:])  # every kept pixel is the input's
    assert not torch.equal(got[0, :, :, :6], got[1, :, :, :6])  # the masked region is generated, per-image seeds
    assert (got[..., :6] - x[..., :6]).abs().float().mean() > 2


def test_a_pixel_mask_goes_to_the_latent_grid_regenerating_any_cell_it_touches():
    from difflab.edit import downsample_mask

    mask = torch.zeros(2, 1, 8, 12, dtype=torch.bool)
    mask[0, 0, 5, 0] = True  # one pixel: the cell (1, 0) of the 4 px grid
    mask[1, 0, :4, 4:8] = True  # exactly one cell: (0, 1)
    want = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    want[0, 0, 1, 0] = want[1, 0, 0, 1] = True
    assert torch.equal(downsample_mask(mask, 4), want)
    assert torch.equal(downsample_mask(mask, 1), mask)
    with pytest.raises(ConfigError, match="cannot downsample"):
        downsample_mask(mask, 5)
