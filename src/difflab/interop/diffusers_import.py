"""Import a diffusers model folder (``difflab import --diffusers PATH``).

The folder is what ``save_pretrained`` writes, in one of two layouts:

- a pipeline folder (``DDPMPipeline.save_pretrained(PATH)``): ``PATH/unet/config.json``,
  ``PATH/unet/diffusion_pytorch_model.safetensors`` and ``PATH/scheduler/scheduler_config.json``
  (``PATH/model_index.json`` is read when present, to refuse latent and text-conditional pipelines);
- a model folder (``UNet2DModel.save_pretrained(PATH)``): ``PATH/config.json`` and the weights, with the
  scheduler's config given as ``--scheduler FILE`` or lying beside them as ``PATH/scheduler_config.json``.

Weights are read from safetensors only (``diffusion_pytorch_model.safetensors``, a sharded one with its
``.index.json``, or a single variant such as ``diffusion_pytorch_model.fp16.safetensors``); a folder with
only a pickled ``.bin`` file is refused.

The scheduler config gives the training schedule and the parametrisation (:func:`map_scheduler`):

- ``num_train_timesteps`` -> ``schedule.timesteps``;
- ``beta_schedule`` linear, scaled_linear, squaredcos_cap_v2, sigmoid -> ``schedule.kind`` linear, quadratic,
  cosine, sigmoid (difflab states the beta range for T = 1000, so ``beta_start``/``beta_end`` are scaled by
  T / 1000); ``trained_betas`` -> ``schedule.betas`` (explicit);
- ``prediction_type`` epsilon, v_prediction, sample -> ``loss.prediction`` eps, v, x0;
- the scheduler's class -> the run's ``[sampler]``: DDPMScheduler -> ddpm over every step (its variance),
  DDIMScheduler -> ddim, 50 steps, eta 0, DPMSolverMultistepScheduler -> dpmpp-2m/-3m(-sde), 20 steps,
  Euler/HeunDiscreteScheduler -> euler/heun; the others keep difflab's default.

Settings that change the training schedule or the network's meaning and have no difflab equivalent
(another ``beta_schedule``, ``rescale_betas_zero_snr``, learned variances, continuous or flow-matching
time, thresholding, a clip range other than 1) are refused in one line naming the setting. Sampling-only
settings (timestep spacing, solver order, ...) are accepted: difflab's own sampler flags replace them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difflab.config import from_dict
from difflab.errors import CheckpointError, ConfigError
from difflab.interop.common import ImportedModel, read_json
from difflab.models.diffusers_unet import DiffusersUNet2DConfig
from difflab.models.foreign import ForeignKind, ForeignNetwork
from difflab.parametrization import Prediction
from difflab.samplers import SamplerConfig, SamplerKind
from difflab.schedule import BetaSchedule, ScheduleConfig, VarianceType
from difflab.train.checkpoint import load_tensors

WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"

#: diffusers schedulers of the discrete-time VP family (betas, num_train_timesteps): the ones whose config
#: describes a schedule difflab has
VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler", "PNDMScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
)
BETA_SCHEDULES = {"linear": BetaSchedule.LINEAR, "scaled_linear": BetaSchedule.QUADRATIC,
                  "squaredcos_cap_v2": BetaSchedule.COSINE, "sigmoid": BetaSchedule.SIGMOID}
PREDICTIONS = {"epsilon": Prediction.EPS, "v_prediction": Prediction.V, "sample": Prediction.X0}
VARIANCES = {None: VarianceType.FIXED_SMALL, "fixed_small": VarianceType.FIXED_SMALL,
             "fixed_small_log": VarianceType.FIXED_SMALL, "fixed_large": VarianceType.FIXED_LARGE,
             "fixed_large_log": VarianceType.FIXED_LARGE}
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
#: keys that only say how the scheduler samples (difflab's sampler options replace them)
SAMPLING_KEYS = frozenset({
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "algorithm_type", "solver_order",
    "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type", "lambda_min_clipped", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "interpolation_type", "sigma_min", "sigma_max",
    "predict_x0", "predictor_order", "corrector_order", "disable_corrector", "solver_p", "flow_shift", "shift_terminal",
    "time_shift_type", "dynamic_thresholding_ratio", "sample_max_value", "variance_type",
})
#: keys that define the training schedule or the network's output, mapped or refused by :func:`map_scheduler`
SCHEDULE_KEYS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "rescale_betas_zero_snr", "timestep_type", "use_flow_sigmas", "use_dynamic_shifting", "clip_sample",
    "clip_sample_range", "thresholding",
})


# -- the folder -----------------------------------------------------------------------------------------
def locate(path: str | Path, scheduler: str | Path | None = None) -> tuple[Path, Path]:
    """(the UNet folder, the scheduler config file) of ``--diffusers PATH`` (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"--diffusers {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"--diffusers {root} is a file; give the folder save_pretrained wrote (unet/ and "
                          "scheduler/, or a UNet2DModel folder with config.json)")
    index = root / "model_index.json"
    if index.is_file():
        _check_pipeline(read_json(index, "--diffusers pipeline index"), index)
    if (root / "unet").is_dir():
        unet = root / "unet"
        sched = Path(scheduler).expanduser() if scheduler else root / "scheduler" / SCHEDULER_CONFIG
    elif (root / "config.json").is_file():
        unet = root
        sched = Path(scheduler).expanduser() if scheduler else root / SCHEDULER_CONFIG
        if not sched.is_file() and not scheduler:
            raise ConfigError(f"--diffusers {root} has no {SCHEDULER_CONFIG}: give the scheduler's config with "
                              "--scheduler FILE (the training schedule is not part of a UNet folder)")
    else:
        raise ConfigError(f"--diffusers {root} holds neither unet/ (a pipeline folder) nor config.json (a UNet2DModel "
                          "folder)")
    return unet, sched


def _check_pipeline(index: dict[str, Any], path: Path) -> None:
    """Refuse pipelines whose UNet is not an unconditional pixel-space UNet2DModel."""
    for latent in ("vqvae", "vae"):
        if index.get(latent):
            raise ConfigError(f"{path}: a latent-diffusion pipeline (it has a {latent}): difflab imports pixel-space "
                              "UNet2DModels")
    unet = index.get("unet")
    name = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    if name is not None and name != "UNet2DModel":
        raise ConfigError(f"{path}: the pipeline's unet is a {name}" + _text_hint(name) +
                          "; difflab imports UNet2DModel")


def _text_hint(name: str) -> str:
    return " (a text-conditional UNet)" if "Condition" in name else ""


def read_unet_config(unet_dir: Path, image_size: int | None = None) -> DiffusersUNet2DConfig:
    """The UNet's ``config.json`` as a checked :class:`DiffusersUNet2DConfig`; ``image_size`` replaces or
    supplies ``sample_size``."""
    path = unet_dir / "config.json"
    raw = read_json(path, "UNet config")
    name = raw.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel" or "cross_attention_dim" in raw:
        name = name if name != "UNet2DModel" else "UNet2DConditionModel"
        raise ConfigError(f"{path}: a {name}{_text_hint(name)} cannot be imported; difflab imports UNet2DModel")
    settings = {k: v for k, v in raw.items() if not k.startswith("_")}
    known = DiffusersUNet2DConfig.__dataclass_fields__
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r} (not a UNet2DModel option of diffusers 0.42); "
                          "difflab cannot honour it")
    size = settings.get("sample_size")
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{path}: sample_size={size} is not square; difflab makes square images")
        settings["sample_size"] = size[0]
    if image_size is not None:
        settings["sample_size"] = image_size
    elif settings.get("sample_size") is None:
        raise ConfigError(f"{path}: sample_size is not set; give the image size with --image-size")
    return from_dict(DiffusersUNet2DConfig, settings, str(path))


def read_weights(unet_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The UNet's weights (safetensors only) and the file they came from."""
    single = unet_dir / WEIGHTS
    index = unet_dir / f"{WEIGHTS}.index.json"
    if single.is_file():
        return _load_safetensors(single), single
    if index.is_file():
        weight_map = read_json(index, "sharded weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            if Path(shard).name != shard:
                raise CheckpointError(f"{index} names a shard outside its folder: {shard!r}")
            tensors.update(_load_safetensors(unet_dir / shard))
        return tensors, index
    variants = sorted(unet_dir.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:
        return _load_safetensors(variants[0]), variants[0]
    if variants:
        raise CheckpointError(f"{unet_dir} holds several weight variants ({', '.join(p.name for p in variants)}) and no "
                              f"{WEIGHTS}; keep the one to import")
    if any(unet_dir.glob("diffusion_pytorch_model*.bin")):
        raise CheckpointError(f"{unet_dir} holds only pickled weights (diffusion_pytorch_model.bin); difflab reads "
                              "safetensors only: re-save the model with save_pretrained(..., safe_serialization=True)")
    raise CheckpointError(f"{unet_dir} has no {WEIGHTS}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path, "weights file")


# -- the scheduler ----------------------------------------------------------------------------------------
def _number(raw: dict[str, Any], key: str, default: float, path: Path) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {key} must be a number, got {value!r}")
    return float(value)


def map_scheduler(raw: dict[str, Any], path: Path) -> tuple[ScheduleConfig, Prediction, SamplerConfig, list[str]]:
    """The difflab schedule, parametrisation and sampler of a diffusers scheduler config, with notes; one
    ConfigError naming the setting for what cannot be mapped (see the module docstring)."""
    name = raw.get("_class_name")
    if name is not None and name not in VP_SCHEDULERS:
        raise ConfigError(f"{path}: scheduler {name!r} is not supported: difflab maps the discrete-time "
                          f"schedulers with betas ({', '.join(VP_SCHEDULERS[:3])}, ...)")
    settings = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(k for k in settings if k not in SAMPLING_KEYS | SCHEDULE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown scheduler setting {unknown[0]!r}={settings[unknown[0]]!r}; difflab "
                          "cannot honour it")

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {key}={settings[key]!r} {why}")

    for key, allowed in (("rescale_betas_zero_snr", False), ("use_flow_sigmas", False), ("use_dynamic_shifting", False),
                         ("thresholding", False)):
        if settings.get(key, allowed) not in (allowed, None):
            why = ("cannot be honoured: difflab clips x0_hat to [-1, 1] (--clip clip) or thresholds it without "
                   "a maximum (--clip dynamic)" if key == "thresholding" else "has no difflab equivalent")
            raise refuse(key, why)
    if settings.get("timestep_type", "discrete") != "discrete":
        raise refuse("timestep_type", "(continuous time) has no difflab equivalent: difflab's network input is the "
                                      "discrete training timestep")
    spacing = settings.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise refuse("timestep_spacing", f"is unknown ({', '.join(TIMESTEP_SPACINGS)} are sampling grids difflab "
                                         "replaces with its own)")
    if settings.get("variance_type") not in VARIANCES:
        raise refuse("variance_type", "(a learned variance) has no difflab equivalent")
    prediction = PREDICTIONS.get(settings.get("prediction_type", "epsilon"))
    if prediction is None:
        raise refuse("prediction_type", f"has no difflab equivalent ({', '.join(PREDICTIONS)} map)")
    notes = []
    if settings.get("clip_sample"):
        clip_range = _number(settings, "clip_sample_range", 1.0, path)
        if clip_range != 1.0:
            raise refuse("clip_sample_range", "cannot be honoured: difflab clips x0_hat to [-1, 1] (--clip clip)")
    else:
        notes.append("the scheduler does not clip x0_hat; difflab's sampling clips it to [-1, 1] unless --clip none")

    steps = settings.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise refuse("num_train_timesteps", "must be an integer >= 2")
    betas = settings.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != steps or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas):
            raise ConfigError(f"{path}: trained_betas must be {steps} numbers in (0, 1) (num_train_timesteps)")
        schedule = ScheduleConfig(timesteps=steps, betas=tuple(float(b) for b in betas))
    else:
        kind = BETA_SCHEDULES.get(settings.get("beta_schedule", "linear"))
        if kind is None:
            raise refuse("beta_schedule", f"has no difflab equivalent ({', '.join(BETA_SCHEDULES)} map)")
        start, end = _number(settings, "beta_start", 1e-4, path), _number(settings, "beta_end", 0.02, path)
        if not 0 < start < end < 1:
            raise ConfigError(f"{path}: need 0 < beta_start < beta_end < 1, got {start} and {end}")
        if kind is BetaSchedule.COSINE:  # diffusers' squaredcos_cap_v2: s = 0.008, betas capped at 0.999
            schedule = ScheduleConfig(kind=kind, timesteps=steps)
        else:  # difflab states the beta range for T = 1000 and scales it by 1000 / T
            schedule = ScheduleConfig(kind=kind, timesteps=steps, beta_start=start * steps / 1000,
                                      beta_end=end * steps / 1000)
    return schedule, prediction, _sampler(name, settings, notes), notes


def _sampler(name: str | None, settings: dict[str, Any], notes: list[str]) -> SamplerConfig:
    """The difflab sampler closest to how the scheduler's pipeline samples."""
    if name in ("DDPMScheduler", "DDPMParallelScheduler"):
        return SamplerConfig.default_for(SamplerKind.DDPM, variance=VARIANCES[settings.get("variance_type")])
    if name in ("DDIMScheduler", "DDIMParallelScheduler"):
        return SamplerConfig.default_for(SamplerKind.DDIM, steps=50, eta=0.0)
    if name == "DPMSolverMultistepScheduler":
        sde = str(settings.get("algorithm_type", "dpmsolver++")).startswith("sde-")
        third = settings.get("solver_order", 2) == 3
        kind = {(False, False): SamplerKind.DPMPP_2M, (True, False): SamplerKind.DPMPP_2M_SDE,
                (False, True): SamplerKind.DPMPP_3M, (True, True): SamplerKind.DPMPP_3M_SDE}[(sde, third)]
        return SamplerConfig.default_for(kind, steps=20)
    if name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        return SamplerConfig.default_for(SamplerKind.EULER if name.startswith("Euler") else SamplerKind.HEUN)
    notes.append(f"no difflab sampler mirrors {name or 'the scheduler'}; the run samples with difflab's default "
                 "(stochastic DDIM, 50 steps)")
    return SamplerConfig(eta=1.0)


def read_diffusers(path: str | Path, *, scheduler: str | Path | None = None, image_size: int | None = None) -> ImportedModel:
    """The model of ``--diffusers PATH`` mapped onto difflab (not yet written: :func:`write_imported_run`)."""
    unet_dir, sched_path = locate(path, scheduler)
    config = read_unet_config(unet_dir, image_size)
    schedule, prediction, sampler, notes = map_scheduler(read_json(sched_path, "scheduler config"), sched_path)
    tensors, weights = read_weights(unet_dir)
    if config.num_train_timesteps not in (None, schedule.timesteps):
        raise ConfigError(f"{unet_dir / 'config.json'}: num_train_timesteps={config.num_train_timesteps} differs from the "
                          f"scheduler's {schedule.timesteps} ({sched_path})")
    foreign = ForeignNetwork(kind=ForeignKind.DIFFUSERS_UNET2D, diffusers=config, source=str(Path(path).expanduser().resolve()))
    return ImportedModel(foreign=foreign, tensors={f"unet.{k}": v for k, v in tensors.items()}, schedule=schedule,
                         prediction=prediction, sampler=sampler, step=0, notes=notes)


def describe(model: ImportedModel) -> str:
    """One line on what was imported: the network, schedule, parametrisation and sampler."""
    s = model.schedule
    kind = "explicit betas" if s.betas else s.kind.value
    return (f"{model.foreign.label}, {model.foreign.channels}x{model.foreign.resolution}x{model.foreign.resolution}, "
            f"{kind} schedule of {s.timesteps} steps, predicts {model.prediction.value}; "
            f"sampler {model.sampler.sampler.value} "
            f"({'every step' if model.sampler.steps is None else f'{model.sampler.steps} steps'})")


__all__ = ["describe", "locate", "map_scheduler", "read_diffusers", "read_unet_config", "read_weights"]
