"""Bring your own model: diffusers and denoising-diffusion-pytorch models imported as difflab runs, difflab runs
exported to diffusers. The foreign models are built here with random weights (no hub, no network), and every
round trip is numerical: one forward pass within 1e-5 in fp32, the schedules' alpha-bar tables equal."""
from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.config import DataConfig, RunConfig, SamplerConfig, to_dict
from difflab.errors import ConfigError
from difflab.interop.diffusers_import import map_scheduler
from difflab.models.ddpm_pytorch_unet import DDPMPytorchUnetConfig
from difflab.models.diffusers_unet import DiffusersUNet2DConfig
from difflab.models.foreign import ForeignKind, ForeignNetwork
from difflab.models.presets import unet_config
from difflab.models.unet import UNet
from difflab.parametrization import LossConfig, Prediction
from difflab.runs import load_run
from difflab.schedule import NoiseSchedule, ScheduleConfig
from difflab.train.checkpoint import save_checkpoint, start_run_dir
from needs import missing


def _require(module: str, why: str):
    """Import ``module``, or skip (fail under CI, whose `make test` installs it) naming what is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} ({why})", f"`make venv` installs it: {e}")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("difflab: error:"), err
    return lines[0]


def randomize(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (difflab zero-initialises output layers, which would hide every mapping error)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(gain + torch.randn(p.shape, generator=g) * std)
    return module


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
T = torch.tensor([0.0, 417.0, 999.0])


# -- config ---------------------------------------------------------------------------------------------------------
def test_a_foreign_run_config_round_trips_through_json():
    unet = DiffusersUNet2DConfig(sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    lucid = DDPMPytorchUnetConfig(dim=16, dim_mults=(1, 2), attn_heads=2, full_attn=(False, True))
    schedule = ScheduleConfig(timesteps=4, betas=(0.1, 0.2, 0.3, 0.4))
    for foreign in (ForeignNetwork(kind="diffusers-unet2d", diffusers=unet, source="/x"),
                    ForeignNetwork(kind=ForeignKind.DDPM_PYTORCH, ddpm_pytorch=lucid, image_size=16)):
        cfg = RunConfig(model=foreign.shape_model(), schedule=schedule, loss=LossConfig(prediction="v"),
                        data=DataConfig(source="/x", image_size=16, channels=3), foreign=foreign)
        again = RunConfig.from_dict(json.loads(cfg.to_json()))
        assert again == cfg and again.foreign == foreign
    assert lucid.attn_heads == (2, 2) and lucid.full_attn == (False, True)
    assert DDPMPytorchUnetConfig(dim=16, dim_mults=(1, 2, 4)).full_attn == (False, False, True)  # the library's default
    assert RunConfig().foreign is None and "foreign" in RunConfig().to_dict()
    torch.testing.assert_close(NoiseSchedule(schedule).betas, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("bad, message", [
    (dict(kind="diffusers-unet2d"), "needs the table foreign.diffusers"),
    (dict(kind="ddpm-pytorch", ddpm_pytorch=DDPMPytorchUnetConfig(dim_mults=(1, 2)), image_size=15), "divisible by 2"),
    (dict(kind="onnx"), "unknown foreign.kind 'onnx'"),
])
def test_a_bad_foreign_table_is_one_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        ForeignNetwork(**bad)


def test_the_model_table_must_describe_the_foreign_network():
    foreign = ForeignNetwork(kind="ddpm-pytorch", ddpm_pytorch=DDPMPytorchUnetConfig(dim_mults=(1, 2)), image_size=16)
    with pytest.raises(ConfigError, match="makes 3-channel 16 px images, but model.. says 3-channel 32 px"):
        RunConfig(model=unet_config("small"), data=DataConfig(image_size=32), foreign=foreign)
    with pytest.raises(ConfigError, match="schedule.betas must hold schedule.timesteps=3"):
        ScheduleConfig(timesteps=3, betas=(0.1, 0.2))


# -- diffusers in ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers():
    return _require("diffusers", "the interop extra")


def tiny_unet(diffusers, **kw):
    torch.manual_seed(0)
    args = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, norm_num_groups=8)
    return diffusers.UNet2DModel(**{**args, **kw}).eval()


@pytest.fixture(scope="module")
def pipeline_folder(diffusers, tmp_path_factory):
    """A DDPMPipeline folder (save_pretrained) with a v-prediction DDIMScheduler on the scaled_linear schedule."""
    root = tmp_path_factory.mktemp("diffusers") / "pipe"
    unet = tiny_unet(diffusers)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root)
    return root, unet, scheduler


@pytest.fixture(scope="module")
def imported_run(pipeline_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "imported"
    assert main(["import", "--diffusers", str(pipeline_folder[0]), "--out", str(out)]) == 0
    return out


def test_an_imported_diffusers_pipeline_computes_what_diffusers_computes(pipeline_folder, imported_run):
    _, unet, scheduler = pipeline_folder
    run = load_run(imported_run)
    cfg = run.config
    assert cfg.foreign is not None and cfg.foreign.kind is ForeignKind.DIFFUSERS_UNET2D
    assert cfg.loss.prediction is Prediction.V
    assert (cfg.sampler.sampler.value, cfg.sampler.steps, cfg.sampler.eta) == ("ddim", 50, 0.0)
    assert run.image_shape == (3, 16, 16) and run.step == 0
    with torch.no_grad():
        torch.testing.assert_close(run.model(X, T), unet(X, T).sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(run.schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), atol=1e-6, rtol=1e-5)
    # the stored config says which network it is, so a fresh load rebuilds the diffusers module
    saved = json.loads((imported_run / "config.json").read_text())
    assert saved["foreign"]["kind"] == "diffusers-unet2d" and saved["foreign"]["diffusers"]["block_out_channels"] == [32, 64]


def test_import_then_sample_progress_and_compare_from_the_command_line(imported_run, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sample", "--run", imported_run, "-n", 2, "--steps", 3, "--out", tmp_path / "imgs",
                           "--format", "png", "--no-progress")
    assert code == 0 and sorted(os.listdir(tmp_path / "imgs")) == ["1.png", "2.png"]
    code, _, _ = run_cli(capsys, "progress", "--run", imported_run, "-n", 1, "--steps", 3, "--frames", 2,
                         "--out", tmp_path / "p.png", "--no-progress")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0
    code, out, _ = run_cli(capsys, "compare", "--run", imported_run, "-n", 2, "--samplers", "ddim-3,dpmpp-2m-3",
                           "--out", tmp_path / "cmp", "--no-progress")
    assert code == 0 and len(os.listdir(tmp_path / "cmp" / "dpmpp-2m-3")) == 2
    line = one_line_error(capsys, "train", "--out", imported_run, "--resume")
    assert "holds an imported diffusers UNet2DModel: difflab trains its own UNet only" in line


@pytest.mark.parametrize("schedule", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", num_train_timesteps=400, beta_start=0.0005, beta_end=0.03),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid", num_train_timesteps=250),
    dict(trained_betas=[0.001 * (k + 1) for k in range(50)], num_train_timesteps=50),
])
def test_every_diffusers_beta_schedule_maps_onto_the_same_alpha_bar(diffusers, schedule):
    scheduler = diffusers.DDPMScheduler(**schedule)
    raw = {"_class_name": "DDPMScheduler", **dict(scheduler.config)}
    cfg, prediction, sampler, _ = map_scheduler(raw, Path("scheduler_config.json"))
    ours = NoiseSchedule(cfg)
    assert prediction is Prediction.EPS and sampler.sampler.value == "ddpm" and sampler.steps is None
    assert ours.num_timesteps == scheduler.config.num_train_timesteps
    # diffusers keeps its tables in float32 (its cumprod drifts by ~1e-6); difflab's are float64
    torch.testing.assert_close(ours.betas, scheduler.betas.double(), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(ours.alphas_cumprod, scheduler.alphas_cumprod.double(), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("raw, prediction, sampler", [
    ({"_class_name": "DDIMScheduler", "prediction_type": "sample"}, Prediction.X0, ("ddim", 50)),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, Prediction.EPS, ("dpmpp-2m-sde", 20)),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, Prediction.EPS, ("dpmpp-3m", 20)),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}, Prediction.V, ("euler", 50)),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, Prediction.EPS, ("ddim", 50)),
])
def test_prediction_types_and_scheduler_classes_map(raw, prediction, sampler):
    _, got, cfg, _ = map_scheduler(raw, Path("s.json"))
    assert got is prediction and (cfg.sampler.value, cfg.steps) == sampler


@pytest.mark.parametrize("raw, message", [
    ({"beta_schedule": "exponential"}, "beta_schedule='exponential' has no difflab equivalent"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True has no difflab equivalent"),
    ({"thresholding": True}, "thresholding=True cannot be honoured"),
    ({"clip_sample": True, "clip_sample_range": 2.0}, "clip_sample_range=2.0 cannot be honoured"),
    ({"timestep_spacing": "cosine"}, "timestep_spacing='cosine' is unknown"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range' (a learned variance)"),
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction' has no difflab equivalent"),
    ({"timestep_type": "continuous"}, "timestep_type='continuous' (continuous time)"),
    ({"karras_magic": 3}, "unknown scheduler setting 'karras_magic'=3"),
    ({"_class_name": "ScoreSdeVeScheduler"}, "scheduler 'ScoreSdeVeScheduler' is not supported"),
    ({"trained_betas": [0.1, 2.0], "num_train_timesteps": 2}, "trained_betas must be 2 numbers in (0, 1)"),
])
def test_unmappable_scheduler_settings_are_refused_by_name(raw, message):
    with pytest.raises(ConfigError) as e:
        map_scheduler(raw, Path("sched.json"))
    assert message in str(e.value) and "sched.json" in str(e.value) and "\n" not in str(e.value)


def test_a_unet_folder_with_a_scheduler_file_imports_too(diffusers, tmp_path, capsys):
    unet = tiny_unet(diffusers, block_out_channels=(16, 32), attention_head_dim=16, in_channels=1, out_channels=1)
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=200).save_pretrained(tmp_path / "sched")
    message = one_line_error(capsys, "import", "--diffusers", tmp_path / "unet", "--out", tmp_path / "r0")
    assert "has no scheduler_config.json: give the scheduler's config with --scheduler FILE" in message
    code, out, _ = run_cli(capsys, "import", "--diffusers", tmp_path / "unet", "--scheduler",
                           tmp_path / "sched" / "scheduler_config.json", "--out", tmp_path / "r")
    assert code == 0 and "does not clip" not in out
    run = load_run(tmp_path / "r")
    assert run.schedule.num_timesteps == 200 and run.config.sampler.sampler.value == "ddpm"
    x = X[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(run.model(x, T / 5), unet(x, T / 5).sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["sharded", "fp16-variant"])
def test_sharded_and_fp16_variant_weights_import(diffusers, tmp_path, capsys, layout):
    """The two other layouts save_pretrained writes: shards with an index (the same numbers, so the same
    network), and a half-precision variant file (the same network up to fp16 rounding of its weights)."""
    from safetensors.torch import save_file

    unet = tiny_unet(diffusers, block_out_channels=(16, 32), attention_head_dim=16)
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "unet")
    single = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    single.unlink()
    if layout == "sharded":
        names = sorted(state)
        halves = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
        for shard, keys in halves.items():
            save_file({k: state[k] for k in keys}, str(tmp_path / "unet" / shard))
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
        (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    code, _, err = run_cli(capsys, "import", "--diffusers", tmp_path / "unet", "--out", tmp_path / "r")
    assert code == 0, err
    run = load_run(tmp_path / "r")
    with torch.no_grad():
        want = unet(X, T).sample
        got = run.model(X, T)
    assert got.dtype == torch.float32
    if layout == "sharded":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()  # fp16 weights: close, not equal
    if layout == "sharded":  # an index naming a file outside the folder is refused, not followed
        index["weight_map"][names[0]] = "../elsewhere.safetensors"
        (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        line = one_line_error(capsys, "import", "--diffusers", tmp_path / "unet", "--out", tmp_path / "r2")
        assert "names a shard outside its folder" in line


def _write_unet_folder(root: Path, config: dict, weights: str | None = "diffusion_pytorch_model.safetensors") -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    if weights:
        (root / weights).write_bytes(b"")
    return root


@pytest.mark.parametrize("config, weights, message", [
    ({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}, None,
     "a UNet2DConditionModel (a text-conditional UNet) cannot be imported"),
    ({"_class_name": "UNet2DModel", "sample_size": 16, "num_class_embeds": 10}, None,
     "num_class_embeds=10 (a class-conditional model) is not supported"),
    ({"_class_name": "UNet2DModel", "sample_size": 16, "out_channels": 6}, None, "out_channels=6 differs from in_channels=3"),
    ({"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 4, "out_channels": 4}, None,
     "in_channels=4 is not supported"),
    ({"_class_name": "UNet2DModel", "sample_size": 16, "time_embedding_type": "fourier"}, None, "time_embedding_type='fourier'"),
    ({"_class_name": "UNet2DModel", "sample_size": 16, "attention_type": "gated"}, None, "unknown setting 'attention_type'"),
    ({"_class_name": "UNet2DModel", "sample_size": [16, 32]}, None, "sample_size=[16, 32] is not square"),
    ({"_class_name": "UNet2DModel", "sample_size": 16, "down_block_types": ["CrossAttnDownBlock2D"] * 4}, None,
     "down_block_types='CrossAttnDownBlock2D' is not supported"),
    ({"_class_name": "UNet2DModel", "sample_size": 16}, "diffusion_pytorch_model.bin", "holds only pickled weights"),
    ({"_class_name": "UNet2DModel", "sample_size": 16}, "diffusion_pytorch_model.safetensors", "is damaged"),
])
def test_unmappable_diffusers_models_are_one_line_refusals(tmp_path, capsys, config, weights, message):
    folder = _write_unet_folder(tmp_path / "unet", config, weights)
    line = one_line_error(capsys, "import", "--diffusers", folder, "--out", tmp_path / "run")
    assert message in line, line
    assert not (tmp_path / "run").exists()


def test_latent_pipelines_and_bad_paths_are_refused(tmp_path, capsys):
    (tmp_path / "ldm").mkdir()
    index = {"_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"], "unet": ["diffusers", "UNet2DModel"]}
    (tmp_path / "ldm" / "model_index.json").write_text(json.dumps(index))
    assert "a latent-diffusion pipeline (it has a vqvae)" in one_line_error(capsys, "import", "--diffusers", tmp_path / "ldm",
                                                                              "--out", tmp_path / "r")
    assert "does not exist" in one_line_error(capsys, "import", "--diffusers", tmp_path / "nope", "--out", tmp_path / "r")
    assert "holds neither unet/" in one_line_error(capsys, "import", "--diffusers", tmp_path, "--out", tmp_path / "r")
    line = one_line_error(capsys, "import", "--out", tmp_path / "r")
    assert "one of the arguments --diffusers --ddpm-pytorch is required" in line
    assert "--dim is a --ddpm-pytorch setting" in one_line_error(capsys, "import", "--diffusers", tmp_path, "--dim", 8,
                                                                  "--out", tmp_path / "r")


def test_import_refuses_an_existing_run(imported_run, pipeline_folder, capsys):
    assert "already holds a run" in one_line_error(capsys, "import", "--diffusers", pipeline_folder[0], "--out", imported_run)


# -- difflab out to diffusers, and back -------------------------------------------------------------------------------------
def make_run(path: Path, model_cfg, sampler: SamplerConfig | None = None, loss: LossConfig | None = None,
             schedule: ScheduleConfig | None = None) -> UNet:
    """A run directory holding a difflab UNet with random weights (no training)."""
    net = randomize(UNet(model_cfg)).eval()
    cfg = RunConfig(model=model_cfg, data=DataConfig(image_size=model_cfg.image_size, channels=model_cfg.in_channels),
                    sampler=sampler or SamplerConfig(eta=1.0), loss=loss or LossConfig(), schedule=schedule or ScheduleConfig())
    start_run_dir(path, cfg.to_json(), restart=False)
    save_checkpoint(path, 5, {"model": net.state_dict(), "ema": net.state_dict()}, {"step": 5}, keep=2)
    return net


TINY = unet_config("tiny", dropout=0.0)  # GroupNorm(8) everywhere, attention at 8 px and in the middle


def test_export_to_diffusers_and_import_back_give_the_same_outputs(diffusers, tmp_path, capsys):
    schedule = ScheduleConfig(kind="cosine", timesteps=1000)
    net = make_run(tmp_path / "run", TINY, loss=LossConfig(prediction="v"), schedule=schedule)
    code, out, _ = run_cli(capsys, "export", "--run", tmp_path / "run", "--diffusers", tmp_path / "hf")
    assert code == 0 and "UNet2DModel.from_pretrained" in out
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "hf" / "unet").eval()
    with torch.no_grad():
        ours = net(X, T)
        assert ours.abs().mean() > 0.01  # not the zero output of a fresh difflab network
        torch.testing.assert_close(theirs(X, T).sample, ours, atol=1e-5, rtol=0)
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "hf" / "scheduler")  # the run samples with ddim
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), NoiseSchedule(schedule).alphas_cumprod, atol=2e-6, rtol=1e-4)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "hf")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    # and back: the exported folder imports as a run with the same network and schedule
    assert main(["import", "--diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_run(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.model(X, T), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.schedule.alphas_cumprod, NoiseSchedule(schedule).alphas_cumprod, atol=1e-12, rtol=1e-12)
    assert back.config.loss.prediction is Prediction.V
    # an imported diffusers run exports its own configuration unchanged
    assert main(["export", "--run", str(tmp_path / "back"), "--diffusers", str(tmp_path / "hf2")]) == 0
    for name in ("unet/config.json", "scheduler/scheduler_config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text()) == json.loads((tmp_path / "hf2" / name).read_text())


@pytest.mark.parametrize("sampler, schedule, name", [
    (SamplerConfig.default_for("ddpm", variance="fixed-large"), ScheduleConfig(kind="sigmoid-alphabar", timesteps=100),
     "DDPMScheduler"),
    (SamplerConfig.default_for("dpmpp-2m-sde", steps=20), ScheduleConfig(kind="quadratic", timesteps=500),
     "DPMSolverMultistepScheduler"),
])
def test_exported_schedulers_load_with_the_runs_schedule(diffusers, tmp_path, sampler, schedule, name):
    make_run(tmp_path / "run", TINY, sampler=sampler, schedule=schedule)
    assert main(["export", "--run", str(tmp_path / "run"), "--diffusers", str(tmp_path / "hf")]) == 0
    raw = json.loads((tmp_path / "hf" / "scheduler" / "scheduler_config.json").read_text())
    assert raw["_class_name"] == name
    scheduler = getattr(diffusers, name).from_pretrained(tmp_path / "hf" / "scheduler")
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), NoiseSchedule(schedule).alphas_cumprod, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("model, loss, message", [
    (unet_config("small"), None, "model.norm_group_channels=16 (GroupNorm of 16 channels per group"),
    (unet_config("tiny", block="convnext"), None, "model.block=convnext"),
    (unet_config("tiny", norm="layer"), None, "model.norm=layer"),
    (unet_config("tiny", linear_attention_resolutions=(16,)), None, "model.linear_attention_resolutions=16"),
    (unet_config("tiny", num_classes=10), None, "model.num_classes=10"),
    (TINY, LossConfig(prediction="edm"), "loss.prediction=edm"),
])
def test_unmappable_runs_are_refused_in_one_line_naming_the_field(tmp_path, capsys, model, loss, message):
    make_run(tmp_path / "run", model, loss=loss)
    line = one_line_error(capsys, "export", "--run", tmp_path / "run", "--diffusers", tmp_path / "hf")
    assert message in line and "has no diffusers equivalent" in line, line
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_non_empty_folder(tmp_path, capsys):
    make_run(tmp_path / "run", TINY)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("")
    assert "is not empty" in one_line_error(capsys, "export", "--run", tmp_path / "run", "--diffusers", tmp_path / "hf")


# -- denoising-diffusion-pytorch in ------------------------------------------------------------------------------------------
_STUBBED = ("torchvision", "torchvision.transforms", "torchvision.utils", "accelerate")


@pytest.fixture(scope="module")
def ddpm_pytorch():
    """The library, imported with stand-ins for the modules its package imports at the top but its Unet and
    GaussianDiffusion never use (torchvision cannot be installed beside this torch; accelerate is the
    Trainer's); sys.modules is restored afterwards."""
    _require("einops", "denoising-diffusion-pytorch's dependency")
    _require("ema_pytorch", "denoising-diffusion-pytorch's EMA")
    saved = {name: sys.modules.get(name) for name in _STUBBED}
    for name in _STUBBED:
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__dict__.update(transforms=None, utils=None, Accelerator=None)
            sys.modules[name] = stub
    try:
        library = _require("denoising_diffusion_pytorch", "the library the import is checked against")
        yield library
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [m for m in sys.modules if m.startswith("denoising_diffusion_pytorch")]:
            sys.modules.pop(name)


CASES = {
    # the homework's kind of model: linear attention at the first level, full attention at the last
    "rgb": (dict(dim=16, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8),
            dict(beta_schedule="cosine", objective="pred_noise", timesteps=300)),
    # grey, another init_dim, full attention everywhere, per-level heads; the 2.3.4 defaults (sigmoid, pred_v)
    "grey": (dict(dim=8, init_dim=12, dim_mults=(1, 2, 2), channels=1, full_attn=(True, True, True), attn_heads=(1, 2, 2),
                  attn_dim_head=(4, 8, 8)), dict()),
}


def trainer_checkpoint(library, path: Path, unet_kw: dict, diffusion_kw: dict):
    """What ``Trainer.save`` writes, made the same way: the online diffusion model, an EMA of it whose weights
    differ (as after training), the optimizer's state, the step and the library version."""
    from ema_pytorch import EMA

    torch.manual_seed(0)
    unet = library.Unet(**unet_kw)
    diffusion = library.GaussianDiffusion(unet, image_size=16, **diffusion_kw)
    ema = EMA(diffusion, beta=0.995, update_every=10)
    with torch.no_grad():
        for p in ema.ema_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
    diffusion(torch.rand(2, unet.channels, 16, 16)).backward()
    opt.step()
    torch.save({"step": 1234, "model": diffusion.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                "scaler": None, "version": importlib.import_module("denoising_diffusion_pytorch.version").__version__}, path)
    return ema.ema_model.eval(), diffusion.eval()


def _flags(unet_kw: dict, diffusion_kw: dict) -> list[str]:
    flags = ["--dim", unet_kw["dim"], "--dim-mults", ",".join(map(str, unet_kw["dim_mults"])), "--image-size", 16]
    flags += ["--channels", unet_kw.get("channels", 3)]
    for key, value in diffusion_kw.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_trainer_checkpoint_imports_with_its_ema_weights(ddpm_pytorch, tmp_path, capsys, case):
    unet_kw, diffusion_kw = CASES[case]
    ema, online = trainer_checkpoint(ddpm_pytorch, tmp_path / "model-3.pt", unet_kw, diffusion_kw)
    extra = {k: v for k, v in unet_kw.items() if k not in ("dim", "dim_mults", "channels")}
    (tmp_path / "unet.toml").write_text("".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n"
                                                for k, v in extra.items()))
    code, out, _ = run_cli(capsys, "import", "--ddpm-pytorch", tmp_path / "model-3.pt", "--config", tmp_path / "unet.toml",
                           *_flags(unet_kw, diffusion_kw), "--out", tmp_path / "run")
    assert code == 0 and "took the ema weights (step 1234)" in out, out
    run = load_run(tmp_path / "run")
    channels = unet_kw.get("channels", 3)
    x, t = X[:, :channels], torch.tensor([0, 150, 299]) if case == "rgb" else torch.tensor([0, 500, 999])
    with torch.no_grad():
        want = ema.model(x, t)
        torch.testing.assert_close(run.model(x, t.float()), want, atol=1e-5, rtol=0)
        assert (online.model(x, t) - want).abs().max() > 1e-3  # the EMA weights, not the online ones
    torch.testing.assert_close(run.schedule.alphas_cumprod, ema.alphas_cumprod.double(), atol=1e-6, rtol=1e-5)
    want_prediction = {"pred_noise": Prediction.EPS, "pred_v": Prediction.V}[diffusion_kw.get("objective", "pred_v")]
    assert run.config.loss.prediction is want_prediction and run.step == 1234
    assert run.config.sampler.sampler.value == "ddpm" and run.config.sampler.steps is None  # the library's own sampling
    code, _, _ = run_cli(capsys, "sample", "--run", tmp_path / "run", "-n", 2, "--steps", 3, "--out", tmp_path / "imgs",
                         "--no-progress")
    assert code == 0 and len(os.listdir(tmp_path / "imgs")) == 2
    line = one_line_error(capsys, "export", "--run", tmp_path / "run", "--diffusers", tmp_path / "hf")
    assert "foreign.kind=ddpm-pytorch (the run's network is a denoising-diffusion-pytorch Unet) has no diffusers" in line


@pytest.fixture(scope="module")
def checkpoint(ddpm_pytorch, tmp_path_factory):
    path = tmp_path_factory.mktemp("lucid") / "model-1.pt"
    trainer_checkpoint(ddpm_pytorch, path, *CASES["rgb"])
    return path


@pytest.mark.parametrize("flags, message", [
    (["--beta-schedule", "sigmoid"],
     "--beta-schedule sigmoid does not match the betas in {ckpt} (they are the cosine schedule's)"),
    (["--timesteps", "1000"], "--timesteps 1000 does not match {ckpt}: its schedule has 300 steps"),
    (["--objective", "pred_v"], "--objective pred_v does not match the loss weights in {ckpt} (they are pred_noise's)"),
    (["--dim", "32"], "tensor(s) of another shape (first: "),
    (["--dim-mults", "1,2,4"], "does not match the denoising-diffusion-pytorch Unet configuration: "),
])
def test_stated_settings_the_checkpoint_contradicts_are_refused(checkpoint, tmp_path, capsys, flags, message):
    base = {"--dim": "16", "--dim-mults": "1,2", "--image-size": "16", "--beta-schedule": "cosine", "--objective": "pred_noise",
            "--timesteps": "300"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    (tmp_path / "attn.json").write_text(json.dumps({"attn_heads": 2, "attn_dim_head": 8}))
    argv = [a for kv in base.items() for a in kv]
    line = one_line_error(capsys, "import", "--ddpm-pytorch", checkpoint, "--config", tmp_path / "attn.json", *argv,
                          "--out", tmp_path / "run")
    assert message.format(ckpt=checkpoint) in line, line
    assert not (tmp_path / "run").exists()


def test_bad_checkpoints_and_unsupported_settings_are_one_line(checkpoint, tmp_path, capsys):
    def refuse(*argv):
        return one_line_error(capsys, "import", *argv, "--out", tmp_path / "run")

    common = ["--dim", 16, "--dim-mults", "1,2", "--image-size", 16]
    torch.save({"ema": {"x": types.SimpleNamespace(a=1)}}, tmp_path / "pickled.pt")
    line = refuse("--ddpm-pytorch", tmp_path / "pickled.pt", *common)
    assert "holds objects other than tensors (types.SimpleNamespace), which difflab does not unpickle" in line
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "is not a readable torch checkpoint" in refuse("--ddpm-pytorch", tmp_path / "junk.pt", *common)
    assert "does not exist" in refuse("--ddpm-pytorch", tmp_path / "none.pt", *common)
    assert "--dim is required" in refuse("--ddpm-pytorch", checkpoint, "--image-size", 16)
    assert "--image-size is required" in refuse("--ddpm-pytorch", checkpoint, "--dim", 16)
    (tmp_path / "sc.toml").write_text("self_condition = true\n")
    line = refuse("--ddpm-pytorch", checkpoint, "--config", tmp_path / "sc.toml", *common)
    assert "self_condition=true is not supported" in line
    (tmp_path / "typo.toml").write_text("dim_mult = [1, 2]\n")
    assert "unknown setting 'dim_mult'" in refuse("--ddpm-pytorch", checkpoint, "--config", tmp_path / "typo.toml", *common)
    (tmp_path / "bad.toml").write_text("dim = [\n")
    assert "is not valid TOML" in refuse("--ddpm-pytorch", checkpoint, "--config", tmp_path / "bad.toml", *common)
    torch.save({"model": {"model.init_conv.weight": torch.zeros(1)}}, tmp_path / "online.pt")
    assert "has no EMA weights ('ema'); pass --weights model" in refuse("--ddpm-pytorch", tmp_path / "online.pt", *common)


def test_the_rebuilt_unet_matches_the_library_in_isolation(ddpm_pytorch):
    """Many layouts, one forward pass each, without the import around it."""
    from difflab.models.ddpm_pytorch_unet import DDPMPytorchUnet

    for kw in (dict(dim=8, dim_mults=(1, 2, 4)), dict(dim=12, dim_mults=(2, 1), full_attn=(False, False), attn_heads=3,
                                                       attn_dim_head=4, sinusoidal_pos_emb_theta=1000)):
        torch.manual_seed(0)
        theirs = ddpm_pytorch.Unet(**kw).eval()
        ours = DDPMPytorchUnet(DDPMPytorchUnetConfig(**kw))
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(X, T), theirs(X, T.long()), atol=1e-5, rtol=0)
    assert to_dict(DDPMPytorchUnetConfig(dim=8, dim_mults=(1, 2)))["attn_heads"] == [4, 4]


def test_a_foreign_table_without_its_kind_is_a_config_error():
    """A hand-edited config.json whose foreign table lacks a required option: one ConfigError naming it."""
    import json

    from difflab.config import RunConfig, resolve_config

    raw = json.loads(resolve_config(preset="tiny", flags={"data.source": "x", "data.image_size": 16}).to_json())
    raw["foreign"] = {}
    with pytest.raises(ConfigError, match=r"config.foreign needs the option config.foreign.kind"):
        RunConfig.from_dict(raw)
