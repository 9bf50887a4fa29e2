"""The CLI end to end on a tiny run, and every kind of bad input as a one-line error (exit 2)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    for k in range(24):
        arr = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{k}.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


TINY = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--no-progress",
        "train.sample_every=2", "train.sample_grid_size=4", "train.precision=fp32"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--data", str(image_folder), "--out", str(out), "--max-steps", "3", *TINY]) == 0
    return out


def test_train_writes_a_complete_run(trained_run):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["model"]["image_size"] == 16 and cfg["model"]["in_channels"] == 3
    assert (trained_run / "samples" / "latest.png").is_file()
    assert (trained_run / "ema.safetensors").is_file()
    assert len((trained_run / "log.jsonl").read_text().splitlines()) >= 1


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, capsys, image_folder):
    code, out, _ = run(capsys, "train", "--data", image_folder, "--out", tmp_path / "x", "--dry-run", *TINY, "train.lr=3e-4")
    assert code == 0 and json.loads(out)["train"]["lr"] == 3e-4
    assert not (tmp_path / "x").exists()


def test_sample_layout_and_seeds_independent_of_batch_size(tmp_path, capsys, trained_run):
    a, b = tmp_path / "a", tmp_path / "b"
    code, out, _ = run(capsys, "sample", "--run", trained_run, "-n", 5, "--steps", 4, "--batch-size", 5,
                       "--out", a, "--format", "png", "--grid", tmp_path / "grid.png", "--no-progress")
    assert code == 0 and "wrote 5 images" in out
    # the folder holds the images alone (a submission folder must); the record lies beside it
    assert sorted(os.listdir(a)) == ["1.png", "2.png", "3.png", "4.png", "5.png"]
    record = json.loads((tmp_path / "a.sampling.json").read_text())
    assert record["n"] == 5 and record["images"] == str(a.resolve()) and f"record: {tmp_path / 'a.sampling.json'}" in out
    assert main(["sample", "--run", str(trained_run), "-n", "5", "--steps", "4", "--batch-size", "2",
                 "--out", str(b), "--format", "png", "--no-progress"]) == 0
    for k in range(1, 6):
        x = torch.tensor(np.array(Image.open(a / f"{k}.png"))).int()
        y = torch.tensor(np.array(Image.open(b / f"{k}.png"))).int()
        assert x.shape == (16, 16, 3)
        assert int((x - y).abs().max()) <= 1  # batched float kernels may differ in the last bit
    assert Image.open(tmp_path / "grid.png").size[0] > 16


def test_sample_start_writes_the_rest_of_one_sample_set(tmp_path, capsys, trained_run):
    whole, shard = tmp_path / "whole", tmp_path / "shard"
    common = ["--run", str(trained_run), "--steps", "3", "--format", "png", "--no-progress"]
    assert main(["sample", *common, "-n", "5", "--out", str(whole)]) == 0
    assert main(["sample", *common, "-n", "2", "--out", str(shard)]) == 0
    assert main(["sample", *common, "-n", "3", "--start", "2", "--out", str(shard)]) == 0
    assert sorted(os.listdir(shard)) == ["1.png", "2.png", "3.png", "4.png", "5.png"]
    assert json.loads((tmp_path / "shard.sampling-from-3.json").read_text())["start"] == 2
    assert json.loads((tmp_path / "shard.sampling.json").read_text())["start"] == 0
    for k in range(1, 6):
        x = torch.tensor(np.array(Image.open(whole / f"{k}.png"))).int()
        y = torch.tensor(np.array(Image.open(shard / f"{k}.png"))).int()
        assert int((x - y).abs().max()) <= 1
    capsys.readouterr()
    assert main(["sample", *common, "--start", "-1"]) == 2
    assert "--start" in capsys.readouterr().err


def test_sampling_precision_bf16_is_close_to_fp32_and_fp32_is_the_plain_network(trained_run):
    from difflab.denoiser import Denoiser
    from difflab.runs import load_run

    run = load_run(trained_run)
    x = torch.randn(6, *run.image_shape, generator=torch.Generator().manual_seed(0))
    plain = Denoiser(run.model, run.schedule, run.config.loss.prediction, clip="none").predict(x, 500.0).eps
    fp32 = run.denoiser("none", "fp32").predict(x, 500.0).eps
    bf16 = run.denoiser("none", "bf16").predict(x, 500.0).eps
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.is_contiguous()
    assert torch.allclose(fp32, plain, atol=1e-6)  # channels_last alone does not change the numbers
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert 0 < rel < 0.03  # bf16 has an 8-bit mantissa: ~0.4% per op, a few ops deep
    fp16 = run.denoiser("none", "fp16").predict(x, 500.0).eps  # fp16 autocast: a 10-bit mantissa, closer than bf16
    assert 0 < (fp16 - fp32).norm() / fp32.norm() < rel
    from difflab.errors import ConfigError
    with pytest.raises(ConfigError, match="--precision"):
        run.denoiser("none", "fp8")


def test_sample_ddpm_and_jpg_default(tmp_path, trained_run):
    assert main(["sample", "--run", str(trained_run), "-n", "2", "--sampler", "ddpm", "--steps", "5",
                 "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert (tmp_path / "d" / "1.jpg").is_file() and (tmp_path / "d" / "2.jpg").is_file()


def test_resume_continues_from_the_checkpoint(capsys, trained_run, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    code, out, err = run(capsys, "train", "--out", copy, "--resume", "--max-steps", 5, "--no-progress")
    assert code == 0, err
    assert "step 5" in out
    code, _, err = run(capsys, "train", "--out", copy, "--resume", "--image-size", 32)
    assert code == 2 and "only train.* options may change" in err and "data.image_size=32 (saved: 16)" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "{tmp}/r"], "--data"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
        (["train", "--data", "{empty}", "--out", "{tmp}/r"], "no image files"),
        (["train", "--data", "fashion-mnist", "--out", "{tmp}/r", "train.nope=1"], "unknown option 'train.nope'"),
        (["train", "--data", "fashion-mnist", "--out", "{tmp}/r", "--preset", "huge"], "invalid choice"),
        (["train", "--data", "fashion-mnist", "--out", "{tmp}/r", "--max-steps", "0"], "positive integer"),
        (["train", "--data", "fashion-mnist", "--out", "{tmp}/r", "--config", "{tmp}/none.toml"], "does not exist"),
        (["train", "--out", "{tmp}/nothing", "--resume"], "not a difflab run"),
        (["sample", "--run", "{tmp}/nothing"], "not a difflab run"),
        (["sample", "--run", "{run}", "--sampler", "plms"], "invalid choice"),
        (["sample", "--run", "{run}", "--sampler", "ddpm", "--eta", "0.5"], "eta"),
        (["sample", "--run", "{run}", "--steps", "5000"], "exceeds"),
        (["sample", "--run", "{run}", "--eta", "2"], "eta"),
        (["bogus"], "invalid choice"),
        # found when tried as a new user would (issue 13)
        (["sample", "--run", "{run}", "--out", "{file}"], "--out {file} is a file"),
        (["sample", "--run", "{run}", "--grid", "{empty}"], "--grid {empty} is a folder"),
        (["sample", "--run", "{run}", "--grid", "{tmp}/grid.gif"], "must end in .png"),
        (["train", "--data", "{empty}", "--out", "{file}"], "--out {file} is a file"),  # before reading the data
        (["train", "--data", "fashion-mnist", "--image-size", "7", "--out", "{tmp}/r"],
         "--image-size 7: must be a multiple of 4 for this preset"),
        (["train", "--data", "fashion-mnist", "--image-size", "18", "--out", "{tmp}/r", "--dry-run"],
         "--image-size 18: must be a multiple of 4"),
        (["train", "--out", "{tmp}/r1", "--resume"], "--out {tmp}/r1: not a difflab run directory (it does not exist)"),
        (["sample", "--run", "{mismatch}"], "tensor(s) of another shape (first: "),
        (["train", "--data", "fashion-mnist", "--batch-size", "7", "train.grad_accum=2", "--out", "{tmp}/r", "--dry-run"],
         "train.batch_size=7 must be divisible by train.grad_accum=2"),
        (["progress", "--run", "{run}", "--sampler", "ddim", "--variance", "fixed-large"], "--variance applies to the ddpm"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, trained_run, mismatched_run, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    fmt = dict(tmp=tmp_path, empty=empty, run=trained_run, file=file, mismatch=mismatched_run)
    argv, message = [a.format(**fmt) for a in argv], message.format(**fmt)
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("difflab: error:"), err
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def mismatched_run(tmp_path_factory, trained_run):
    """A copy of the tiny run whose config.json asks for a wider network than its weights hold."""
    import shutil

    copy = tmp_path_factory.mktemp("mismatch") / "run"
    shutil.copytree(trained_run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"]["base_channels"] *= 2
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def test_train_refuses_to_overwrite(capsys, trained_run, image_folder):
    code, _, err = run(capsys, "train", "--data", image_folder, "--out", trained_run, *TINY)
    assert code == 2 and "already holds a run" in err


EVERY_COMMAND = ["train", "demo", "sample", "edit", "inpaint", "upscale", "eval", "fid-stats", "eval-seg", "noise", "progress",
                 "animate", "curves", "compare", "gan", "import", "export", "serve", "train-autoencoder", "segment"]


def test_help_lists_every_command(capsys):
    """Every command is listed with its one-line help, and each answers --help with its own usage."""
    from difflab.cli import commands

    assert sorted(commands()) == sorted(EVERY_COMMAND)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    listed = capsys.readouterr().out
    for name, (help_, _, _) in commands().items():
        assert f"    {name}" in listed and help_.split()[0] in listed, name
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: difflab {name}"), name


# The commands that never run a network: they read logs, masks or schedule tables, or convert weight files.
NO_NETWORK = {"eval-seg", "noise", "curves", "import", "export"}


def test_every_command_that_runs_a_network_takes_device(capsys):
    """Issue 17: ``--device`` on every command (and ``gan`` subcommand) that runs a network."""
    from difflab.cli import commands

    for name in sorted(set(commands()) - NO_NETWORK):
        argvs = [[name, sub, "--help"] for sub in ("train", "sample", "interpolate")] if name == "gan" else [[name, "--help"]]
        for argv in argvs:
            with pytest.raises(SystemExit):
                main(argv)
            assert "--device" in capsys.readouterr().out, argv


def test_version(capsys):
    import difflab

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"difflab {difflab.__version__}"


def test_sample_reads_the_runs_sampler_table(tmp_path, capsys, image_folder):
    """A run trained with a [sampler] table samples that way unless flags say otherwise; another
    --sampler starts from that sampler's own defaults."""
    runs = tmp_path / "r"
    assert main(["train", "--data", str(image_folder), "--out", str(runs), "--max-steps", "1", *TINY,
                 "sampler.sampler=dpmpp-2m", "sampler.steps=3", "sampler.trailing=true"]) == 0

    def sample(*flags):
        assert main(["sample", "--run", str(runs), "-n", "1", "--no-progress", *flags]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        return json.loads(Path(out.split("record: ")[1].split(";")[0].strip()).read_text())

    rec = sample()
    assert rec["sampler"]["sampler"] == "dpmpp-2m" and rec["sampler"]["steps"] == 3 and rec["sampler"]["trailing"]
    assert rec["images"] == str((runs / "samples" / "dpmpp-2m-3-trailing").resolve())
    rec = sample("--steps", "5")
    assert (rec["sampler"]["sampler"], rec["sampler"]["steps"], rec["sampler"]["trailing"]) == ("dpmpp-2m", 5, True)
    assert sample("--no-trailing")["sampler"]["trailing"] is False
    rec = sample("--sampler", "ddim", "--eta", "1")
    assert (rec["sampler"]["sampler"], rec["sampler"]["steps"], rec["sampler"]["trailing"], rec["sampler"]["eta"]) == \
        ("ddim", 50, False, 1.0)


def test_warnings_keep_their_origin():
    """difflab's own warnings print as one line; another library's keep Python's format (not relabelled).
    Run in a fresh interpreter: pytest replaces the warning display in its own process."""
    import subprocess
    import sys

    script = """
import sys, warnings
from difflab.cli import main, sample
from difflab.errors import DifflabWarning
def noisy(args):
    warnings.warn("3 files skipped", DifflabWarning)
    warnings.warn("old API", FutureWarning)
    return 0
help_, add, _ = sample.COMMANDS["sample"]
sample.COMMANDS["sample"] = (help_, add, noisy)
sys.exit(main(["sample", "--run", "x"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "difflab: warning: 3 files skipped\n" in proc.stderr
    assert "FutureWarning: old API" in proc.stderr and "difflab: warning: old API" not in proc.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_before_exiting(tmp_path, image_folder, sig):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "difflab", "train", "--data", str(image_folder), "--out", str(out),
         "--max-steps", "100000", *TINY, "train.log_every=1", "train.checkpoint_every=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-1000:]
    assert f"({sig})" in stdout
    state = json.loads((out / "latest.json").read_text())
    assert state["step"] >= 1
    assert main(["train", "--out", str(out), "--resume", "--max-steps", str(state["step"] + 1), "--no-progress"]) == 0


def test_sample_compile_without_a_compiler_is_a_one_line_error(tmp_path, capsys, trained_run, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert main(["sample", "--run", str(trained_run), "--compile", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile needs a C++ compiler" in err[0] and not (tmp_path / "s").exists()


@pytest.mark.slow  # inductor compiles the tiny UNet's forward: minutes on a 2-core CPU
def test_compiled_sampling_gives_the_eager_images(trained_run):
    from difflab.runs import load_run
    from difflab.samplers import SamplerConfig, sample

    run = load_run(trained_run)
    cfg = SamplerConfig(sampler="dpmpp-2m-sde", steps=4)
    eager = sample(run.denoiser(precision="fp32"), 3, run.image_shape, cfg, progress=False)
    compiled = sample(run.denoiser(precision="fp32", compile=True), 3, run.image_shape, cfg, progress=False)
    assert torch.allclose(eager, compiled, atol=1e-4), float((eager - compiled).abs().max())


def test_edit_and_inpaint_end_to_end(tmp_path, capsys, trained_run, image_folder):
    """SDEdit on a folder (inputs of another size are resized, with a note), strength 0 returns the
    inputs, the same seed gives the same edits; inpainting keeps the known pixels of the fitted input."""
    import shutil

    from difflab.data.decode import open_image, resize_center_crop

    src = tmp_path / "in"
    src.mkdir()
    for k in (0, 1):
        shutil.copy(image_folder / f"{k}.png", src / f"face{k}.png")  # 24 x 20: resized to 16 x 16
    code, out, err = run(capsys, "edit", "--run", trained_run, "--image", src, "--strength", "0.6", "-n", "2",
                             "--steps", "4", "--out", tmp_path / "e", "--grid", tmp_path / "e.png", "--no-progress")
    assert code == 0, err
    assert "note: resized 2 of 2 input image(s) to the run's 16x16" in out
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["face0-1.png", "face0-2.png", "face1-1.png", "face1-2.png"]
    rec = json.loads((tmp_path / "e.sampling.json").read_text())
    assert rec["task"] == "sdedit" and rec["start_timestep"] == 599.0 and rec["steps_run"] == 4 and rec["n"] == 4
    assert Image.open(tmp_path / "e.png").size == (3 * 18 + 2, 2 * 18 + 2)  # input + 2 edits per row
    code, _, err = run(capsys, "edit", "--run", trained_run, "--image", src, "--strength", "0.6", "-n", "2",
                           "--steps", "4", "--out", tmp_path / "e2", "--batch-size", "1", "--no-progress")
    assert code == 0, err
    for name in ("face0-2.png", "face1-1.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "e" / name)), np.asarray(Image.open(tmp_path / "e2" / name)))
    fitted = np.asarray(resize_center_crop(open_image(src / "face1.png"), 16))
    code, _, err = run(capsys, "edit", "--run", trained_run, "--image", src / "face1.png", "--strength", "0",
                           "-n", "1", "--out", tmp_path / "zero", "--no-progress")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "zero" / "face1-1.png")), fitted)

    code, out, err = run(capsys, "inpaint", "--run", trained_run, "--image", src / "face1.png", "--mask-kind", "center",
                             "-n", "2", "--steps", "6", "--jump", "2", "--resample", "2", "--out", tmp_path / "p",
                             "--grid", tmp_path / "p.png", "--no-progress")
    assert code == 0, err
    rec = json.loads((tmp_path / "p.sampling.json").read_text())
    assert rec["task"] == "inpaint" and rec["network_calls_per_image"] == 6 + 2 * 2
    keep = np.ones((16, 16), bool)
    keep[4:12, 4:12] = False
    for k in (1, 2):
        got = np.asarray(Image.open(tmp_path / "p" / f"face1-{k}.png"))
        assert np.array_equal(got[keep], fitted[keep]) and not np.array_equal(got[~keep], fitted[~keep])


@pytest.mark.parametrize("argv, message", [
    (["edit", "--image", "{tmp}/missing.png"], "--image {tmp}/missing.png does not exist"),
    (["edit", "--image", "{img}", "--strength", "1.5"], "argument --strength: expected a number in [0, 1], got '1.5'"),
    (["inpaint", "--image", "{img}"], "one of the arguments --mask --mask-kind is required"),
    (["inpaint", "--image", "{img}", "--mask", "{tmp}/small.png"], "is 8x8 but its image is 24x20"),
    (["inpaint", "--image", "{img}", "--mask-kind", "left", "--sampler", "dpmpp-2m"], "inpainting takes --sampler ddpm or ddim"),
    (["edit", "--image", "{img}", "--class", "cats"], "this run was trained without labels"),
])
def test_edit_bad_input_is_one_line(tmp_path, capsys, trained_run, image_folder, argv, message):
    Image.new("L", (8, 8), 255).save(tmp_path / "small.png")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{img}", str(image_folder / "0.png")) for a in argv]
    code, _, err = run(capsys, *args[:1], "--run", trained_run, *args[1:], "--no-progress")
    message = message.replace("{tmp}", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and message in err, err
