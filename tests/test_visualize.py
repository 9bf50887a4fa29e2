"""difflab noise / progress / animate / curves / compare on a tiny run: files of the right shape,
pixels where the layout says, trajectories that end in the images `difflab sample` writes, and
DDIM rows faster than the DDPM row."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from difflab.cli import main
from difflab.errors import ConfigError, DataError
from difflab.samplers import SamplerKind
from difflab.schedule import NoiseSchedule
from difflab.visualize.compare import parse_sampler_spec, parse_sampler_specs
from difflab.visualize.curves import read_log, smooth, smooth_positive
from difflab.visualize.figure import cell_size, save_figure
from difflab.visualize.noising import noise_strip_figure, noised
from difflab.visualize.progress import frame_indices

T = 100  # the tiny run's schedule length: DDPM over every step stays cheap


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for k in range(16):
        Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"{k}.png")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--data", str(root), "--out", str(out), "--max-steps", "3", "--preset", "tiny",
                 "--image-size", "16", "--batch-size", "8", "--no-progress", "train.sample_every=0",
                 "train.precision=fp32", "train.log_every=1", f"schedule.timesteps={T}"]) == 0
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth 24x20 colour picture (gradients), so noise is easy to tell from content."""
    y, x = np.mgrid[0:20, 0:24]
    arr = np.stack([x * 10, y * 12, 255 - x * 10], axis=2).astype(np.uint8)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(arr).save(path)
    return path


def _load(path) -> Image.Image:
    """An image file, fully read and closed (no ResourceWarning inside a later CLI call)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _cell(img: np.ndarray, layout, panel: int, row: int, col: int) -> np.ndarray:
    left, top, right, bottom = layout.cell_box(panel, row, col)
    return img[top:bottom, left:right]


def _upscaled(u8_chw: torch.Tensor, cell: int) -> np.ndarray:
    arr = u8_chw.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return np.asarray(im.resize((cell, cell), Image.NEAREST).convert("RGB")).astype(int)


# -- noise ----------------------------------------------------------------------------------------
def test_noised_uses_one_noise_draw_for_every_t():
    s = NoiseSchedule.from_name("cosine", 1000)
    x0, eps = torch.rand(3, 8, 8) * 2 - 1, torch.randn(3, 8, 8)
    ts = [0, 10, 500, 999]
    xt = noised(x0, s, ts, eps)
    for k, t in enumerate(ts):
        ab = float(s.alphas_cumprod[t])
        recovered = (xt[k] - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        assert torch.allclose(recovered, eps, atol=1e-4)


def test_noise_strip_layout_and_pixels(tmp_path):
    from difflab.data.dataset import to_uint8

    x0 = torch.linspace(-1, 1, 3 * 16 * 16).reshape(3, 16, 16)
    scheds = {"linear": NoiseSchedule.from_name("linear", 1000), "cosine": NoiseSchedule.from_name("cosine", 1000)}
    fig = noise_strip_figure(x0, scheds, [0, 500, 999], seed=3)
    path = save_figure(fig, tmp_path / "strip.png")
    lay = fig.layout
    assert (lay.rows, lay.cols, lay.cell) == (2, 4, cell_size(16))
    img = np.asarray(_load(path).convert("RGB")).astype(int)
    assert img.shape[1::-1] == lay.size
    # column 0 of each row is the original, drawn pixel for pixel where the layout says
    for row in range(2):
        assert np.array_equal(_cell(img, lay, 0, row, 0), _upscaled(to_uint8(x0), lay.cell))
    # and t = 999 of the linear schedule is the shared noise (abar_999 ~ 4e-5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    want = _upscaled(to_uint8(noised(x0, scheds["linear"], [999], noise)[0]), lay.cell)
    assert np.abs(_cell(img, lay, 0, 0, 3) - want).max() <= 1
    # one more timestep adds exactly one column
    wider = noise_strip_figure(x0, scheds, [0, 250, 500, 999]).layout
    assert wider.size == (lay.size[0] + lay.cell + lay.gap, lay.size[1])


def test_noise_command_writes_strip_and_schedule_figure(tmp_path, capsys, photo):
    code, out, err = run(capsys, "noise", "--image", photo, "--schedule", "linear,cosine,sigmoid", "--timesteps",
                         "0,100,999", "--size", "16", "--out", tmp_path / "n.png", "--compare-schedules",
                         "--schedules-out", tmp_path / "s.png")
    assert code == 0, err
    assert str(tmp_path / "n.png") in out and str(tmp_path / "s.png") in out
    strip = _load(tmp_path / "n.png")
    sched = _load(tmp_path / "s.png")
    assert strip.width > 4 * 64 and strip.height > 3 * 64  # 3 rows x 4 columns of 64 px cells
    assert sched.size == (1100, 420)
    assert len(sched.convert("RGB").getcolors(1 << 20)) > 50  # coloured lines, not a blank canvas


# -- progress -------------------------------------------------------------------------------------
def test_frame_indices():
    assert frame_indices(1000, 5) == [0, 250, 500, 750, 1000]
    assert frame_indices(4, 20) == [0, 1, 2, 3, 4]  # never more frames than states
    assert frame_indices(10, 2) == [0, 10]
    with pytest.raises(ConfigError):
        frame_indices(10, 1)


def _progress(capsys, tiny_run, tmp_path, name, *extra):
    out, npz = tmp_path / f"{name}.png", tmp_path / f"{name}.npz"
    code, stdout, err = run(capsys, "progress", "--run", tiny_run, "--sampler", "ddim", "--steps", 8,
                            "--out", out, "--npz", npz, "--no-progress", *extra)
    assert code == 0, err
    assert str(out) in stdout
    with np.load(npz) as arrays:
        return _load(out), dict(arrays)


def test_progress_grid_rows_columns_and_final_images(tmp_path, capsys, tiny_run):
    img, arr = _progress(capsys, tiny_run, tmp_path, "a", "-n", 3, "--frames", 5)
    assert arr["x"].shape == (5, 3, 3, 16, 16) and arr["x0"].shape == (5, 3, 3, 16, 16)
    assert arr["step"].tolist() == [0, 2, 4, 6, 8]
    assert arr["t"][0] == T - 1 and arr["t"][-1] == -1  # x_T at t = T - 1 ... the sample
    assert np.array_equal(arr["x"][-1], arr["x0"][-1])
    # the last column is what `difflab sample` writes for the same seeds
    assert main(["sample", "--run", str(tiny_run), "-n", "3", "--sampler", "ddim", "--steps", "8", "--eta", "0", "--format", "png",
                 "--clip", "clip", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    for k in range(3):
        ref = np.asarray(_load(tmp_path / "s" / f"{k + 1}.png")).astype(int)
        assert np.abs(arr["x"][-1, k].transpose(1, 2, 0).astype(int) - ref).max() <= 1
    # geometry: one more column / one more row / no x0 panel change the size by whole cells
    cell = cell_size(16)
    img2, _ = _progress(capsys, tiny_run, tmp_path, "b", "-n", 4, "--frames", 6)
    assert img2.width - img.width == cell + 4
    assert img2.height - img.height == 2 * (cell + 4)  # two panels, one more row each
    img3, _ = _progress(capsys, tiny_run, tmp_path, "c", "-n", 3, "--frames", 5, "--no-x0")
    assert img3.width == img.width and img3.height < img.height * 0.6


# -- animate --------------------------------------------------------------------------------------
def test_animate_gif_frames_durations_and_size(tmp_path, capsys, tiny_run):
    gif = tmp_path / "d.gif"
    code, out, err = run(capsys, "animate", "--run", tiny_run, "--out", gif, "-n", 2, "--frames", 6,
                         "--sampler", "ddim", "--steps", 10, "--duration", 50, "--hold", 700, "--scale", 2,
                         "--no-progress")
    assert code == 0, err
    assert str(gif) in out
    with Image.open(gif) as im:
        assert im.n_frames == 6
        assert [f.info["duration"] for f in ImageSequence.Iterator(im)] == [50] * 5 + [700]
        # two 16 px images side by side with 2 px padding, scaled 2x, under a 25 px caption band
        assert im.size == ((2 * (16 + 2) + 2) * 2, (16 + 2 + 2) * 2 + 25)
    # more frames than states: one frame per state
    code, out, err = run(capsys, "animate", "--run", tiny_run, "--out", gif, "-n", 1, "--frames", 50,
                         "--sampler", "ddim", "--steps", 4, "--x0", "--no-progress")
    assert code == 0, err
    with Image.open(gif) as im:
        assert im.n_frames == 5 and im.height == (2 * (16 + 2) + 2) * 3 + 25  # x_t and x0 rows, scale 3


# -- curves ---------------------------------------------------------------------------------------
def test_curves_png(tmp_path, capsys, tiny_run):
    code, out, err = run(capsys, "curves", "--run", tiny_run, "--out", tmp_path / "c.png")
    assert code == 0, err
    assert "3 log records" in out
    img = _load(tmp_path / "c.png")
    assert img.size == (1100, 420)
    assert len(img.convert("RGB").getcolors(1 << 20)) > 50  # lines in several colours


def test_read_log_resume_torn_line_and_damage(tmp_path):
    path = tmp_path / "log.jsonl"
    rec = lambda s, loss: json.dumps({"step": s, "loss": loss, "loss_quartiles": [loss, None, 1.0, 2.0]})  # noqa: E731
    # steps 1-3, then a resume from step 1 re-logs 2 and 3; a crash tore the last line
    path.write_text("\n".join([rec(1, 5.0), rec(2, 4.0), rec(3, 3.0), rec(2, 2.5), rec(3, 2.0), rec(4, 1.0)])
                    + '\n{"step": 5, "lo')
    log = read_log(path)
    assert log.step.tolist() == [1, 2, 3, 4] and log.loss.tolist() == [5.0, 2.5, 2.0, 1.0]
    assert np.isnan(log.quartiles[:, 1]).all() and log.quartiles[0, 3] == 2.0
    path.write_text(rec(1, 1.0) + "\nnot json\n" + rec(2, 1.0) + "\n")
    with pytest.raises(DataError, match="log.jsonl:2"):
        read_log(path)


def test_smooth_closed_forms():
    v = np.array([3.0, 3.0, 3.0])
    assert np.allclose(smooth(v, 0.9), v)  # debiased: a constant stays constant from the first point
    x = np.array([1.0, 2.0, np.nan, 4.0])
    assert np.allclose(smooth(x, 0.0), [1, 2, 2, 4])
    # weight w: s_2 = ((1-w) w x1 + (1-w) x2) / ((1-w) w + (1-w)) = (w x1 + x2) / (1 + w)
    assert math.isclose(smooth(np.array([1.0, 2.0]), 0.5)[1], (0.5 + 2) / 1.5)
    # positive values are smoothed in log space: the same weights give a geometric mean
    assert math.isclose(smooth_positive(np.array([1.0, 100.0]), 0.5)[1], 100 ** (1 / 1.5))
    assert np.allclose(smooth_positive(np.array([-1.0, 1.0]), 0.0), [-1, 1])  # not positive: plain EMA


# -- compare --------------------------------------------------------------------------------------
def test_parse_sampler_specs():
    s = parse_sampler_spec("ddim-50-eta1", 1000)
    assert s.name == "ddim-50-eta1" and s.config.steps == 50 and s.config.eta == 1.0
    assert parse_sampler_spec("ddpm", 1000).name == "ddpm-1000"
    assert parse_sampler_spec("ddim-eta0.5", 1000).name == "ddim-50-eta0.5"
    t = parse_sampler_spec("dpmpp-2m-10-trailing", 1000)
    assert t.name == "dpmpp-2m-10-trailing" and t.config.trailing and t.config.steps == 10
    assert parse_sampler_spec("ddim-20-eta1-trailing", 1000).config.trailing
    for kind in SamplerKind:  # every kind, including names with dashes, takes a step count
        assert parse_sampler_spec(f"{kind.value}-7", 1000).config.sampler is kind
    for bad, msg in [("ddim-x", "unknown sampler"), ("ddpm-10-eta1", "eta"), ("ddim-0", "steps"),
                     ("ddim-2000", "exceed"), ("ddim-eta1-50", "unknown sampler"), ("ddpm-trailing", "exceed"),
                     ("ddim-trailing-10", "unknown sampler")]:
        with pytest.raises(ConfigError, match=msg):
            parse_sampler_spec(bad, 1000)
    with pytest.raises(ConfigError, match="twice"):
        parse_sampler_specs("ddim-50,ddim-50", 1000)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_sampler_specs("ddim,,ddpm", 1000)


def test_compare_table_json_plots_and_ddim_faster(tmp_path, capsys, tiny_run):
    out = tmp_path / "cmp"
    code, stdout, err = run(capsys, "compare", "--run", tiny_run, "-n", 2, "--samplers", "ddpm,ddim-4,ddim-4-eta1",
                            "--out", out, "--no-progress")
    assert code == 0, err
    result = json.loads((out / "compare.json").read_text())
    rows = {r["sampler"]: r for r in result["rows"]}
    assert list(rows) == [f"ddpm-{T}", "ddim-4", "ddim-4-eta1"]
    assert [r["nfe"] for r in result["rows"]] == [T, 4, 4]  # network calls per image, counted by a hook
    # 25x fewer network evaluations: DDIM must be faster however loaded the machine is
    assert rows["ddim-4"]["seconds"] < rows[f"ddpm-{T}"]["seconds"]
    assert rows["ddim-4-eta1"]["seconds"] < rows[f"ddpm-{T}"]["seconds"]
    assert rows["ddim-4"]["speedup_vs_ddpm"] > 1 and rows["ddim-4"]["fid"] is None
    table = (out / "compare.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in body] == list(rows)
    assert "FID" not in table.splitlines()[0]  # no --real: speed only
    for name in rows:
        assert sorted(p.name for p in (out / name).iterdir()) == ["1.png", "2.png"]
    # same seeds: eta = 0 DDIM is deterministic given x_T, so its images equal `difflab sample`'s
    assert main(["sample", "--run", str(tiny_run), "-n", "2", "--sampler", "ddim", "--steps", "4", "--eta", "0", "--format", "png",
                 "--clip", "clip", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    a = np.asarray(_load(out / "ddim-4" / "2.png")).astype(int)
    assert np.abs(a - np.asarray(_load(tmp_path / "s" / "2.png")).astype(int)).max() <= 1
    assert _load(out / "compare.png").size == (600, 420)  # speed panel only
    samples = _load(out / "samples.png")
    assert samples.height > 3 * cell_size(16) and str(out) in stdout
    # a second, smaller comparison into the same folder leaves no stale images behind to be scored
    assert main(["compare", "--run", str(tiny_run), "-n", "1", "--samplers", "ddim-4", "--out", str(out),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "ddim-4").iterdir()) == ["1.png"]


def test_compare_detection_rate(tmp_path, capsys, tiny_run, lbp_cascade_path):
    out = tmp_path / "cmp"
    code, _, err = run(capsys, "compare", "--run", tiny_run, "-n", 2, "--samplers", "ddim-2", "--metrics", "detect",
                       "--detectors", "lbp", "--cascade", lbp_cascade_path, "--out", out, "--no-progress")
    assert code == 0, err
    (row,) = json.loads((out / "compare.json").read_text())["rows"]
    assert row["detect_rate"] == 0.0  # noise-trained 16 px blobs are no anime faces
    assert "detection rate" in (out / "compare.md").read_text().splitlines()[0]


def test_compare_detection_rate_finds_faces(tmp_path, anime_faces_dir, lbp_cascade_path):
    """The positive case: a 'model' whose x0 prediction is a real anime face makes every sampler's
    images that face, and compare must report them detected (a detector that never fires fails here)."""
    from difflab.config import RunConfig
    from difflab.data.dataset import to_float
    from difflab.data.decode import open_image, resize_center_crop
    from difflab.denoiser import Denoiser
    from difflab.metrics.detect import DetectProtocol, make_detector, prepare_image
    from difflab.visualize.compare import run_comparison

    detector = make_detector("lbp", cascade=str(lbp_cascade_path))
    faces = (resize_center_crop(open_image(p), 64) for p in sorted(anime_faces_dir.iterdir())[:50])
    face = next(f for f in faces if detector.count(prepare_image(f, DetectProtocol())) > 0)  # one it finds
    x0 = to_float(torch.from_numpy(np.array(face)).permute(2, 0, 1)[None])

    class FaceNet(torch.nn.Module):  # predicts that face, whatever the noisy input
        def forward(self, x, t):
            return x0.expand(len(x), -1, -1, -1)

    class FaceRun:  # what run_comparison reads from a LoadedRun
        path, step, image_shape, pixel_shape, codec = tmp_path, 0, (3, 64, 64), (3, 64, 64), None
        schedule = NoiseSchedule.from_name("linear", T)
        config = RunConfig()  # unconditional

        def denoiser(self, clip, precision):
            return Denoiser(FaceNet(), self.schedule, "x0", clip=clip)

    result = run_comparison(FaceRun(), parse_sampler_specs("ddim-3,dpmpp-2m-4", T), n=3, out=tmp_path / "cmp",
                            eval_kwargs={"metrics": "detect", "detectors": "lbp", "cascade": str(lbp_cascade_path)},
                            progress=False)
    assert [row["detect_rate"] for row in result["rows"]] == [1.0, 1.0]


@pytest.mark.slow
def test_compare_fid_kid_against_a_folder(tmp_path, capsys, tiny_run, fid_weights):
    weights = fid_weights
    real = tmp_path / "real"
    real.mkdir()
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(real / f"{k}.png")
    code, _, err = run(capsys, "compare", "--run", tiny_run, "-n", 4, "--samplers", "ddim-2,ddim-4", "--real", real,
                       "--kid-subset-size", 4, "--fid-weights", weights, "--out", tmp_path / "cmp",
                            "--no-progress")
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for row in result["rows"]:
        assert math.isfinite(row["fid"]) and row["fid"] >= 0 and row["kid_mean"] is not None
    assert _load(tmp_path / "cmp" / "compare.png").width == 1100  # speed and quality panels


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["noise"], "--image"),
        (["noise", "--image", "{tmp}/missing.png"], "missing.png"),
        (["noise", "--image", "{photo}", "--timesteps", "0,5000"], "--timesteps"),
        (["noise", "--image", "{photo}", "--timesteps", "a,b"], "--timesteps"),
        (["noise", "--image", "{photo}", "--schedule", "linear,bogus"], "--schedule"),
        (["noise", "--image", "{photo}", "--out", "{tmp}/x.jpg"], ".png"),
        (["progress", "--run", "{tmp}/nothing"], "not a difflab run"),
        (["progress", "--run", "{run}", "--frames", "1", "--sampler", "ddim", "--steps", "2"], "--frames"),
        (["progress", "--run", "{run}", "--steps", "5000"], "exceeds"),
        (["animate", "--run", "{run}", "--out", "{tmp}/a.png"], ".gif"),
        (["curves", "--run", "{tmp}/nothing"], "not a difflab run"),
        (["curves", "--run", "{run}", "--smooth", "1"], "--smooth"),
        (["compare", "--run", "{run}", "--samplers", "ddim-x"], "unknown sampler"),
        (["compare", "--run", "{run}", "--metrics", "fid"], "--real"),
        (["compare", "--run", "{run}", "--metrics", "fid", "--real", "{tmp}/none"], "does not exist"),
        (["compare", "--run", "{run}", "--metrics", "speed"], "metric"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, tiny_run, photo, argv, message):
    argv = [a.format(tmp=tmp_path, run=tiny_run, photo=photo) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("difflab: error:"), err
    assert message in lines[0], lines[0]


def test_help_lists_the_new_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ["noise", "progress", "animate", "curves", "compare"]:
        assert cmd in out
