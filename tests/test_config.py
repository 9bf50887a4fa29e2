import json

import pytest

from difflab.config import RunConfig, apply_overrides, load_toml, resolve_config
from difflab.errors import ConfigError
from difflab.models.unet import BlockType
from difflab.schedule import BetaSchedule


def test_default_round_trips_exactly_through_json():
    cfg = resolve_config()
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_everything_non_default_round_trips(tmp_path):
    cfg = resolve_config(
        preset="default",
        flags={"data.source": str(tmp_path), "data.image_size": 64, "train.lr": 3e-4},
        overrides=[
            "schedule.kind=cosine", "schedule.timesteps=500", "loss.prediction=v", "loss.weighting=min-snr",
            "model.block=convnext", "model.channel_mults=1,2,2", "model.attention_resolutions=16",
            "data.augment.hflip=true", "data.augment.rotate_degrees=5", "train.lr_decay=cosine",
            "train.precision=fp32", "sampler.sampler=ddpm", "sampler.steps=100", "train.minutes=2.5",
        ],
    )
    assert cfg.schedule.kind is BetaSchedule.COSINE and cfg.model.block is BlockType.CONVNEXT
    assert cfg.model.channel_mults == (1, 2, 2) and cfg.model.image_size == 64
    assert cfg.data.augment.hflip is True and cfg.train.lr == 3e-4
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert RunConfig.load(path) == cfg


def test_image_size_moves_preset_attention_with_it():
    cfg = resolve_config(flags={"data.image_size": 28})
    assert cfg.model.image_size == 28 and cfg.model.in_channels == 1
    assert cfg.model.attention_resolutions == (7,)  # 'small' attends at its lowest level (8 at 32 px)


def test_toml_file_and_precedence(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny"\n[train]\nlr = 5e-4\nbatch_size = 16\n[schedule]\nkind = "cosine"\n')
    cfg = resolve_config(toml=load_toml(f), flags={"train.batch_size": 32}, overrides=["train.lr=1e-3"])
    assert cfg.preset == "tiny" and cfg.schedule.kind is BetaSchedule.COSINE
    assert cfg.train.batch_size == 32 and cfg.train.lr == 1e-3


def test_presets_bring_their_learning_rate_and_a_toml_file_beats_it(tmp_path):
    assert resolve_config(preset="small").train.lr == 1e-3
    assert resolve_config(preset="ddpm-cifar10").train.lr == 2e-4  # Ho et al.'s value
    f = tmp_path / "run.toml"
    f.write_text('preset = "small"\n[train]\nlr = 5e-4\n')
    assert resolve_config(toml=load_toml(f)).train.lr == 5e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown option 'train.lrr'"),
        (["train.lr"], "key=value"),
        (["train.lr=fast"], "takes a number"),
        (["schedule.kind=cosin"], "'linear', 'cosine'"),
        (["train"], "key=value"),
        (["train=3"], "group of options"),
        (["data.augment.hflip=maybe"], "true or false"),
        (["model.image_size=16"], "differs from data.image_size"),
        (['cond.templates=["{list}", '], "cond.templates: not a JSON list"),
        (["model.channel_mults=[1, 2.5]"], "model.channel_mults must be of type int"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


def test_unknown_preset_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="unknown --preset 'huge'"):
        resolve_config(preset="huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown option config.trian"):
        RunConfig.from_dict({"trian": {}})


def test_frozen():
    cfg = resolve_config()
    with pytest.raises(Exception):
        cfg.train = None  # type: ignore[misc]
    assert apply_overrides(cfg, ["train.seed=3"]).train.seed == 3 and cfg.train.seed == 0


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from difflab.io import atomic_write_bytes
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.txt", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_list_overrides_keep_their_spaces():
    """`a, b` lists strip the spaces around items; a JSON list keeps items with commas and spaces."""
    cfg = resolve_config(overrides=['cond.templates=["{list}", "{hair}-haired girl with {eyes} eyes, drawn"]',
                                    "model.channel_mults=1, 2 ,2"])
    assert cfg.cond.templates == ("{list}", "{hair}-haired girl with {eyes} eyes, drawn")
    assert cfg.model.channel_mults == (1, 2, 2)
    cfg = resolve_config(overrides=["cond.templates=a girl with {and}, {list}"])
    assert cfg.cond.templates == ("a girl with {and}", "{list}")
