import json
import math

import pytest
import torch

from difflab.config import resolve_config
from difflab.data.dataset import ImageData, load_dataset
from difflab.errors import CheckpointError, ConfigError
from difflab.runs import load_run
from difflab.train import Trainer
from difflab.train import checkpoint as ckpt_mod
from difflab.train.ema import ema_beta
from difflab.train.loop import lr_at


def synthetic(n=48, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8), None, "synthetic", 0)


def tiny_cfg(*overrides, size=16):
    return resolve_config(
        preset="tiny",
        flags={"data.source": "synthetic", "data.image_size": size, "data.channels": 1},
        overrides=[
            "train.batch_size=8", "train.max_steps=8", "train.sample_every=0", "train.checkpoint_every=3",
            "train.log_every=2", "train.precision=fp32", "train.warmup_steps=2", "model.dropout=0.2",
            "data.augment.hflip=true", "data.augment.rotate_degrees=10", "train.ema_halflife_images=40",
            *overrides,
        ],
    )


def states(run_dir):
    out = {}
    for name in ("model", "ema"):
        out[name] = ckpt_mod.load_tensors(run_dir / f"{name}.safetensors")
    return out


@pytest.mark.parametrize("extra", [[], ["train.grad_accum=2", "train.lr_decay=cosine"]])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, extra):
    cfg, data = tiny_cfg(*extra), synthetic()
    Trainer(cfg, tmp_path / "straight", data=data, progress=False).run()
    Trainer(cfg, tmp_path / "split", data=data, progress=False).run(stop_at=5)
    first_log = (tmp_path / "split" / "log.jsonl").read_text()
    Trainer(cfg, tmp_path / "split", data=data, progress=False, resume=True).run()
    a, b = states(tmp_path / "straight"), states(tmp_path / "split")
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    losses = lambda p: [(r["step"], r["loss"]) for r in map(json.loads, p.read_text().splitlines())]
    straight = losses(tmp_path / "straight" / "log.jsonl")
    split = losses(tmp_path / "split" / "log.jsonl")
    assert {s for s, _ in split} >= {2, 4, 8} and first_log
    assert dict(split)[8] == dict(straight)[8]


def test_checkpoint_layout_and_keep_last_k(tmp_path):
    cfg = tiny_cfg("train.max_steps=10", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False).run()
    run = tmp_path / "run"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-0000008", "step-0000010"]
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "checkpoints/step-0000010"
    for f in ["config.json", "model.safetensors", "ema.safetensors", "log.jsonl"]:
        assert (run / f).is_file()
    assert {p.name for p in (run / "checkpoints" / "step-0000010").iterdir()} == {
        "model.safetensors", "ema.safetensors", "train_state.safetensors", "state.json"}
    loaded = load_run(run)
    assert loaded.step == 10 and not loaded.model.training


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_cfg("train.max_steps=6")
    trainer = Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False)
    trainer.run(stop_at=3)
    good = states(tmp_path / "run")
    real_save = ckpt_mod.save_tensors
    calls = {"n": 0}

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:  # model written, then the process 'dies' while writing the EMA
            path.write_bytes(b"\x00" * 10)
            raise OSError("disk on fire")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_tensors", dying_save)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*step-0000006: disk on fire; the previous "
                                              "checkpoint .*step-0000003 is intact"):
        trainer.run()
    monkeypatch.undo()
    run = load_run(tmp_path / "run")
    assert run.step == 3
    after = states(tmp_path / "run")
    for k in good["ema"]:
        assert torch.equal(good["ema"][k], after["ema"][k])
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]
    # a killed process can also leave a half-written temp directory: it is ignored, then swept
    (tmp_path / "run" / "checkpoints" / "step-0000006.tmp-dead").mkdir()
    assert load_run(tmp_path / "run").step == 3
    Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False, resume=True).run()
    assert load_run(tmp_path / "run").step == 6
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    cfg = tiny_cfg("train.max_steps=1")
    Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False).run()
    with pytest.raises(CheckpointError, match="already holds a run"):
        Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False)
    with pytest.raises(CheckpointError, match="not a difflab run|no checkpoint"):
        load_run(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="divisible"):
        Trainer(tiny_cfg("train.batch_size=9", "train.grad_accum=2"), tmp_path / "other", data=synthetic(), progress=False)


def test_a_run_folder_may_be_a_link_to_a_folder_still_to_be_made(tmp_path):
    """runs/x -> /other/disk/x before /other/disk/x exists: the run is made there (was a FileExistsError)."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x").symlink_to(tmp_path / "disk" / "x")
    Trainer(tiny_cfg("train.max_steps=1"), tmp_path / "runs" / "x", data=synthetic(), progress=False).run()
    assert (tmp_path / "disk" / "x" / "config.json").is_file() and load_run(tmp_path / "runs" / "x").step == 1


def test_schedules_of_lr_and_ema():
    cfg = tiny_cfg("train.lr=1e-3", "train.warmup_steps=10", "train.lr_decay=cosine", "train.max_steps=110",
                   "train.min_lr_ratio=0.1").train
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    # EMA half-life in images: after `halflife` images the old weights count one half
    assert ema_beta(1e9, 100, 1000, 0) ** 10 == pytest.approx(0.5)
    assert ema_beta(1000, 100, 1e6, 0.05) ** 0.5 == pytest.approx(0.5)  # ramp-up: half-life 50 images


def test_tiny_unet_learns_fashion_mnist(tmp_path, fashion_mnist_dir):
    """A few hundred steps of the tiny preset clearly lower the loss on real data."""
    full = load_dataset("fashion-mnist", 16, progress=False)
    data = ImageData(full.images[:4096], None, "fashion-mnist subset", 0)
    cfg = tiny_cfg("train.max_steps=300", "train.batch_size=32", "train.lr=2e-3", "train.log_every=25",
                   "train.warmup_steps=20", "model.dropout=0", "data.augment.hflip=false",
                   "data.augment.rotate_degrees=0", "train.checkpoint_every=1000", "train.precision=auto")
    Trainer(cfg, tmp_path / "run", data=data, progress=False).run()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_tensorboard_logs_the_jsonl_scalars_and_the_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")  # an optional package; the `test` extra installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("train.tensorboard=true", "train.sample_every=4", "train.sample_grid_size=4")
    Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False).run(stop_at=4)
    Trainer(cfg, tmp_path / "run", data=synthetic(), progress=False, resume=True).run()  # appends
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
    assert [e.step for e in events.Scalars("loss_by_t_quartile/q1")] == [
        r["step"] for r in log if r["loss_quartiles"][0] is not None
    ]
    images = events.Images("samples")
    assert [im.step for im in images] == [4, 8]
    # a 2x2 grid of 16 px images with 2 px padding
    assert (images[0].width, images[0].height) == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        Trainer(tiny_cfg("train.tensorboard=true"), tmp_path / "run", data=synthetic(), progress=False)
    assert not (tmp_path / "run").exists()  # nothing half-made to trip over on the next try


@pytest.mark.slow  # inductor compiles the tiny UNet's forward and backward: minutes on a 2-core CPU
def test_compiled_training_follows_the_eager_run(tmp_path):
    """train.compile=true changes how the network runs, not what it computes: the same seed gives
    the same losses and weights to float rounding (dropout off, since compiled code draws its own
    random numbers)."""
    data = synthetic()
    runs = {}
    for name, extra in [("eager", []), ("compiled", ["train.compile=true"])]:
        cfg = tiny_cfg("model.dropout=0", "train.max_steps=4", "train.log_every=1", *extra)
        Trainer(cfg, tmp_path / name, data=data, progress=False).run()
        losses = [r["loss"] for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())]
        runs[name] = (losses, states(tmp_path / name)["model"])
    (le, we), (lc, wc) = runs["eager"], runs["compiled"]
    assert len(le) == len(lc) == 4 and all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(le, lc)), (le, lc)
    assert all(torch.allclose(we[k], wc[k], rtol=1e-3, atol=1e-5) for k in we)


def test_compile_without_a_compiler_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ / c++ here
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="train.compile=true needs a C\\+\\+ compiler"):
        Trainer(tiny_cfg("train.compile=true"), tmp_path / "run", data=synthetic(), progress=False)
    assert not (tmp_path / "run").exists()


def poison(trainer, bad_steps):
    """Make the loss NaN on the steps (0-based step counter before the step) in ``bad_steps``."""
    loss = trainer.objective.loss

    def poisoned(x0, t, noise, **cond):
        out = loss(x0, t, noise, **cond)
        return out * float("nan") if bad_steps(trainer.step) else out

    trainer.objective.loss = poisoned


def test_a_non_finite_step_is_skipped_counted_and_changes_nothing(tmp_path):
    """A NaN loss on the 4th step: no update (weights, Adam moments and step count as after step 3),
    counted in the log, the logged loss stays finite, training goes on to the end."""
    trainer = Trainer(tiny_cfg("train.checkpoint_every=100"), tmp_path / "run", data=synthetic(), progress=False)
    poison(trainer, lambda step: step == 3)
    trainer.run(stop_at=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
    trainer.run(stop_at=4)
    assert trainer.step == 4 and int(trainer.nonfinite_total) == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(m[k], v) for m, s in zip(moments, trainer.optimizer.state.values()) for k, v in s.items())
    trainer.run()
    assert trainer.step == 8 and not all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["nonfinite_steps"] == 1
    assert all(bool(v.isfinite().all()) for v in ckpt_mod.load_tensors(tmp_path / "run" / "model.safetensors").values())


def test_k_non_finite_steps_in_a_row_stop_training_and_keep_the_last_checkpoint(tmp_path):
    """NaN from the 4th step on, max_nonfinite_steps = 3 (checkpoints every 3, logs every 2): the run
    stops at step 6 before its checkpoint; step 3 stays the latest; the error is one line naming both."""
    from difflab.train.loop import TrainingDiverged

    trainer = Trainer(tiny_cfg("train.max_nonfinite_steps=3"), tmp_path / "run", data=synthetic(), progress=False)
    poison(trainer, lambda step: step >= 3)
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    message = str(err.value)
    assert "diverged at step 6" in message and "3 steps in a row" in message and "\n" not in message
    assert message.count("checkpoints/step-0000003") == 1
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000003"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4] and logged[-1]["nonfinite_steps"] == 1


def test_fp16_trains_with_a_gradient_scaler_and_resumes_exactly(tmp_path):
    """fp16 autocast on the CPU (as on a T4/V100): the loss is scaled, overflowing steps are skipped
    and counted (a huge initial scale makes the first steps overflow), the scaler's state is in the
    checkpoint, and a resumed run is bit-identical to an uninterrupted one."""
    cfg, data = tiny_cfg("train.precision=fp16"), synthetic()

    def run(path, stop_at=None, resume=False):
        t = Trainer(cfg, path, data=data, progress=False, resume=resume)
        assert t.scaler is not None and t.autocast is torch.float16
        if not resume:
            t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=3)
        t.run(stop_at=stop_at)
        return t

    straight = run(tmp_path / "straight")
    assert straight.skipped_steps >= 1
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == straight.skipped_steps and log[-1]["grad_scale"] < 2.0**40
    assert all(math.isfinite(r["loss"]) for r in log)
    run(tmp_path / "split", stop_at=5)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-0000005" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] < 2.0**40 and "skipped_steps" in state
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.skipped_steps == straight.skipped_steps
    a, b = states(tmp_path / "straight"), states(tmp_path / "split")
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
