"""Training recipes (``--recipe``): what each sets, the order of precedence, and a run made with one
sampling with the recipe's sampler when no sampler flag is given."""
import json
import math

import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import RunConfig, resolve_config
from difflab.errors import ConfigError
from difflab.recipes import RECIPES, recipe
from difflab.samplers import SamplerKind
from difflab.schedule import BetaSchedule


def folder_flags(size=32):
    return {"data.source": "some/folder", "data.image_size": size, "data.channels": 3}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_builds_and_round_trips(name):
    cfg = resolve_config(recipe=name, flags=folder_flags())
    assert cfg.recipe == name and cfg.preset == RECIPES[name].preset
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_hw_simple_is_the_course_sample_code():
    cfg = resolve_config(recipe="hw-simple", flags=folder_flags())
    m, t, s = cfg.model, cfg.train, cfg.schedule
    assert (m.base_channels, m.channel_mults, m.num_res_blocks) == (16, (1, 2, 4), 2)
    assert (s.kind, s.timesteps) == (BetaSchedule.LINEAR, 100)
    assert (t.batch_size, t.lr, t.adam_beta1, t.adam_beta2, t.warmup_steps, t.grad_clip) == (16, 1e-3, 0.9, 0.99, 0, 1.0)
    # ema-pytorch's decay 0.995 applied every 10 steps of 16 images, as a half-life in images
    assert t.ema_halflife_images == pytest.approx(16 * 10 * math.log(0.5) / math.log(0.995), rel=1e-3)
    assert cfg.loss.prediction.value == "eps" and cfg.data.augment.is_identity
    assert cfg.sampler.sampler is SamplerKind.DDPM and cfg.sampler.steps is None  # all T steps, ancestral


def test_medium_adds_augmentation_and_T_1000_strong_the_cosine_schedule_and_width():
    simple, medium, strong = (resolve_config(recipe=r, flags=folder_flags()) for r in ("hw-simple", "hw-medium", "hw-strong"))
    aug = medium.data.augment
    assert (aug.hflip, aug.rotate_degrees, aug.brightness, aug.contrast) == (True, 10.0, 0.25, 0.25)
    assert medium.schedule.timesteps == 1000 and medium.model == simple.model
    assert strong.schedule.kind is BetaSchedule.COSINE and strong.model.base_channels == 2 * simple.model.base_channels
    assert strong.data.augment == aug


def test_flags_toml_and_overrides_beat_the_recipe():
    cfg = resolve_config(recipe="hw-simple", preset="tiny", toml={"train": {"lr": 5e-4}},
                         flags={**folder_flags(16), "train.batch_size": 8}, overrides=["schedule.timesteps=50"])
    assert cfg.preset == "tiny" and cfg.recipe == "hw-simple"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.schedule.timesteps) == (5e-4, 8, 50)
    assert cfg.train.adam_beta2 == 0.99  # the rest of the recipe stays


def test_unknown_recipe_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown --recipe 'hw-boss'"):
        recipe("hw-boss")
    with pytest.raises(ConfigError, match="hw-simple"):
        resolve_config(recipe="nope", flags=folder_flags())


def test_train_with_a_recipe_then_sample_uses_its_sampler(tmp_path, capsys):
    data = tmp_path / "faces"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(8):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(data / f"{k}.png")
    run = tmp_path / "run"
    argv = ["train", "--recipe", "hw-medium", "--data", data, "--image-size", "16", "--out", run, "--max-steps", "2",
            "--batch-size", "4", "--no-progress", "train.sample_every=0", "train.precision=fp32", "schedule.timesteps=100",
            "sampler.steps=5"]
    assert main([str(a) for a in argv]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["recipe"] == "hw-medium" and saved["data"]["augment"]["rotate_degrees"] == 10.0
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "-n", "2", "--out", str(tmp_path / "imgs"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "imgs.sampling.json").read_text())
    assert record["sampler"]["sampler"] == "ddim" and record["sampler"]["eta"] == 1.0 and record["nfe_per_image"] == 5
    # a resumed run keeps its recipe; naming another is refused in one line
    assert main(["train", "--out", str(run), "--resume", "--recipe", "best", "--no-progress"]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_plain_train_uses_the_best_recipe_and_a_preset_or_config_opts_out(tmp_path, capsys):
    def dry(*extra):
        assert main(["train", "--data", "fashion-mnist", "--out", str(tmp_path / "r"), "--dry-run", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain = dry()
    assert plain["recipe"] == "best" and plain["model"]["num_res_blocks"] == 1
    preset = dry("--preset", "small")
    assert preset["recipe"] == "" and preset["model"]["num_res_blocks"] == 2
    assert preset["sampler"]["eta"] == 1.0  # every run samples stochastically by default
