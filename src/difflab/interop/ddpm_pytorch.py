"""Import a denoising-diffusion-pytorch checkpoint (``difflab import --ddpm-pytorch model-N.pt``).

lucidrains' ``Trainer.save`` writes ``{'step', 'model', 'opt', 'ema', 'scaler', 'version'}`` with
``torch.save``: ``model`` is the ``GaussianDiffusion`` state dict (the ``Unet`` under ``model.``, and the
schedule's buffers ``betas``, ``alphas_cumprod``, ``loss_weight``, ...), ``ema`` the ``ema_pytorch.EMA`` state
dict (the averaged ``GaussianDiffusion`` under ``ema_model.``, the online one under ``online_model.``). difflab
reads it with ``torch.load(weights_only=True)`` only (tensors and plain containers; never code) and takes
the EMA weights (``--weights model`` takes the online ones). A bare ``GaussianDiffusion`` or ``Unet`` state
dict is read too.

The architecture and the diffusion settings are not in the file's tensors in full (the image size, the
objective and the attention layout are not), so the user states them, by flags or a TOML/JSON file of the
library's own argument names (:class:`DDPMPytorchSettings`); what is not stated takes the library's default
**of denoising-diffusion-pytorch 2.3.4** (the version this import is tested against): ``dim_mults
(1, 2, 4, 8)``, ``channels 3``, ``timesteps 1000``, ``beta_schedule 'sigmoid'``, ``objective 'pred_v'``, full
attention at the last level only, 4 heads of 32 channels. Older versions defaulted to other schedules
(linear, then cosine) and to ``pred_noise``: state them for an older checkpoint. What the file does say is
checked, each mismatch one line naming the flag: the weights' shapes against the architecture, the
``betas`` buffer against the stated schedule and timesteps, and the ``loss_weight`` buffer (which differs
per objective) against the objective.

The mapping:

- ``beta_schedule`` linear, cosine, sigmoid -> ``schedule.kind`` linear, cosine, sigmoid-alphabar (the same
  formulas; ``schedule_fn_kwargs`` s, start, end, tau -> cosine_s, sigmoid_start, sigmoid_end, sigmoid_tau);
- ``objective`` pred_noise, pred_x0, pred_v -> ``loss.prediction`` eps, x0, v;
- ``sampling_timesteps`` < timesteps (with ``ddim_sampling_eta``) -> ``[sampler]`` ddim with those steps and
  eta; otherwise ddpm over every step (the library's own ``sample()``).

Refused in one line: ``self_condition``, ``learned_variance``, ``learned_sinusoidal_cond`` /
``random_fourier_features`` (a different network input or output), ``auto_normalize=false`` (data in [0, 1]
where difflab's samplers work in [-1, 1]) and non-square image sizes.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.config import from_dict
from difflab.errors import CheckpointError, ConfigError
from difflab.interop.common import ImportedModel
from difflab.models.ddpm_pytorch_unet import DDPMPytorchUnetConfig
from difflab.models.foreign import ForeignKind, ForeignNetwork
from difflab.parametrization import Prediction
from difflab.samplers import SamplerConfig, SamplerKind
from difflab.schedule import BetaSchedule, ScheduleConfig, make_betas

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LIBRARY_VERSION = "2.3.4"  # the version whose defaults and checkpoint layout this import follows
BETA_SCHEDULES = {"linear": BetaSchedule.LINEAR, "cosine": BetaSchedule.COSINE, "sigmoid": BetaSchedule.SIGMOID_ALPHABAR}
OBJECTIVES = {"pred_noise": Prediction.EPS, "pred_x0": Prediction.X0, "pred_v": Prediction.V}
UNET_KEYS = tuple(f.name for f in dataclasses.fields(DDPMPytorchUnetConfig))
#: GaussianDiffusion/Trainer arguments that only concern training: accepted and ignored
TRAINING_KEYS = ("offset_noise_strength", "min_snr_loss_weight", "min_snr_gamma", "immiscible")
#: settings that change what the network takes or returns, refused unless at the library's default
REFUSED = {"self_condition": False, "learned_variance": False, "learned_sinusoidal_cond": False,
           "random_fourier_features": False, "auto_normalize": True}
SCHEDULE_FN_KWARGS: dict[BetaSchedule, dict[str, str]] = {BetaSchedule.COSINE: {"s": "cosine_s"},
                      BetaSchedule.SIGMOID_ALPHABAR: {"start": "sigmoid_start", "end": "sigmoid_end", "tau": "sigmoid_tau",
                                                      "clamp_min": ""},
                      BetaSchedule.LINEAR: {}}


@dataclass(frozen=True)
class DDPMPytorchSettings:
    """What the user states about a denoising-diffusion-pytorch model: the ``Unet``'s shape and the
    ``GaussianDiffusion`` settings that difflab needs (the library's names and 2.3.4 defaults)."""

    unet: DDPMPytorchUnetConfig
    image_size: int
    timesteps: int = 1000
    beta_schedule: str = "sigmoid"
    objective: str = "pred_v"
    schedule_fn_kwargs: tuple[tuple[str, float], ...] = ()
    sampling_timesteps: int | None = None
    ddim_sampling_eta: float = 0.0

    def schedule(self) -> ScheduleConfig:
        kind = BETA_SCHEDULES[self.beta_schedule]
        fields: dict[str, Any] = {SCHEDULE_FN_KWARGS[kind][k]: v for k, v in self.schedule_fn_kwargs
                                  if SCHEDULE_FN_KWARGS[kind][k]}
        return dataclasses.replace(ScheduleConfig(kind=kind, timesteps=self.timesteps), **fields)

    @property
    def prediction(self) -> Prediction:
        return OBJECTIVES[self.objective]

    def sampler(self) -> SamplerConfig:
        """The library's own sampling: DDIM when ``sampling_timesteps`` < ``timesteps``, else DDPM."""
        steps = self.sampling_timesteps
        if steps is not None and steps < self.timesteps:
            return SamplerConfig.default_for(SamplerKind.DDIM, steps=steps, eta=self.ddim_sampling_eta)
        return SamplerConfig.default_for(SamplerKind.DDPM)


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (any other name) file of settings, as a dict; one ConfigError naming it."""
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()
        data = tomllib.loads(text.decode("utf-8")) if path.suffix.lower() == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder; give a TOML or JSON file") from None
    except (OSError, ValueError, RecursionError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a table of settings, got {type(data).__name__}")
    return data


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def settings_from(values: dict[str, Any], where: str = "--config") -> DDPMPytorchSettings:
    """Check ``values`` (the library's argument names: file settings with the flags laid over them) and
    return the settings; unknown and unsupported settings are one ConfigError naming them."""
    known = set(UNET_KEYS) | {f.name for f in dataclasses.fields(DDPMPytorchSettings)} | set(TRAINING_KEYS) | set(REFUSED)
    known |= {"out_dim"}
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r} (denoising-diffusion-pytorch {LIBRARY_VERSION}'s Unet "
                              "and GaussianDiffusion arguments)")
    for key, default in REFUSED.items():
        if key in values and values[key] != default:
            raise ConfigError(f"{key}={json.dumps(values[key])} is not supported: difflab's samplers call the network with "
                              "(x_t, t) and read one prediction of the image's shape"
                              + (", on data in [-1, 1]" if key == "auto_normalize" else ""))
    channels = values.get("channels", 3)
    if values.get("out_dim") not in (None, channels):
        raise ConfigError(f"out_dim={values['out_dim']} is not supported: the network must return the image's "
                          f"{channels} channels")
    unet_values = {k: values[k] for k in UNET_KEYS if k in values and values[k] is not None}
    for key in ("attn_dim_head", "attn_heads", "full_attn"):  # one value for every level, as the library allows
        if key in unet_values and not isinstance(unet_values[key], (list, tuple)):
            unet_values[key] = [unet_values[key]]
    unet = from_dict(DDPMPytorchUnetConfig, unet_values, "denoising-diffusion-pytorch Unet")
    if "dim" not in values:
        raise ConfigError("--dim is required (the Unet's dim: the library has no default)")
    size = values.get("image_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"image_size={list(size)} is not square; difflab makes square images")
        size = size[0]
    if size is None:
        raise ConfigError("--image-size is required (the GaussianDiffusion's image_size)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % unet.downsample_factor:
        raise ConfigError(f"--image-size {size!r} must be a positive integer divisible by {unet.downsample_factor} "
                          f"({unet.levels} levels)")
    choices: dict[str, dict[str, Any]] = {"beta_schedule": BETA_SCHEDULES, "objective": OBJECTIVES}
    for key, table in choices.items():
        if key in values and values[key] not in table:
            raise ConfigError(f"{_flag(key)} {values[key]!r} is not one of {', '.join(table)}")
    steps = values.get("timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"--timesteps must be an integer >= 2, got {steps!r}")
    kind = BETA_SCHEDULES[values.get("beta_schedule", "sigmoid")]
    kwargs = values.get("schedule_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"schedule_fn_kwargs must be a table, got {kwargs!r}")
    for key, value in kwargs.items():
        if key not in SCHEDULE_FN_KWARGS[kind] or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"schedule_fn_kwargs.{key}={value!r} is not a setting of the {kind.value} schedule "
                              f"({', '.join(SCHEDULE_FN_KWARGS[kind]) or 'none'})")
    sampling = values.get("sampling_timesteps")
    if sampling is not None and (isinstance(sampling, bool) or not isinstance(sampling, int) or not 1 <= sampling <= steps):
        raise ConfigError(f"sampling_timesteps must be an integer in [1, timesteps={steps}], got {sampling!r}")
    eta = values.get("ddim_sampling_eta", 0.0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ConfigError(f"ddim_sampling_eta must be a number in [0, 1], got {eta!r}")
    return DDPMPytorchSettings(unet=unet, image_size=size, timesteps=steps, beta_schedule=values.get("beta_schedule", "sigmoid"),
                               objective=values.get("objective", "pred_v"),
                               schedule_fn_kwargs=tuple((k, float(v)) for k, v in sorted(kwargs.items())),
                               sampling_timesteps=sampling, ddim_sampling_eta=float(eta))


# -- the checkpoint ------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or one CheckpointError naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--ddpm-pytorch {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"--ddpm-pytorch {path} is a folder; give the Trainer's model-N.pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...) for bad files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(f"--ddpm-pytorch {path} holds objects other than tensors ({found.group(1)}), which "
                                  "difflab does not unpickle (it loads with torch.load(weights_only=True))") from None
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        if "Unsupported operand" in text or "invalid load key" in text:
            reason = "not a pickle of tensors"
        raise CheckpointError(f"--ddpm-pytorch {path} is not a readable torch checkpoint ({reason})") from None


@dataclass
class CheckpointParts:
    """The tensors of one network in a checkpoint, the diffusion buffers beside them, and its records."""

    unet: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    which: str  # "ema", "model", or "state dict"
    step: int
    version: str | None


def checkpoint_parts(data: Any, path: Path, weights: str = "ema") -> CheckpointParts:
    """Split a loaded checkpoint into the Unet's weights (``weights``: ema or model) and the diffusion buffers."""
    if not isinstance(data, dict):
        raise CheckpointError(f"--ddpm-pytorch {path} holds a {type(data).__name__}, not a checkpoint dict")
    raw_step, raw_version = data.get("step"), data.get("version")
    step = raw_step if isinstance(raw_step, int) else 0
    version = raw_version if isinstance(raw_version, str) else None
    if weights == "ema" and isinstance(data.get("ema"), dict):
        state, prefix, which = data["ema"], "ema_model.", "ema"
    elif isinstance(data.get("model"), dict):
        if weights == "ema":
            raise CheckpointError(f"--ddpm-pytorch {path} has no EMA weights ('ema'); pass --weights model for the "
                                  "online weights")
        state, prefix, which = data["model"], "", "model"
    else:
        state, prefix, which = data, "", "state dict"
    tensors = {k[len(prefix):]: v for k, v in state.items()
               if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if any(k.startswith("model.") for k in tensors):  # a GaussianDiffusion state dict: the Unet is under model.
        unet = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        buffers = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    else:
        unet, buffers = tensors, {}
    if not unet:
        raise CheckpointError(f"--ddpm-pytorch {path} holds no Unet weights (no {prefix}model.* tensors)")
    return CheckpointParts(unet=unet, buffers=buffers, which=which, step=step, version=version)


def _matches(stored: torch.Tensor, ours: torch.Tensor) -> bool:
    return stored.shape == ours.shape and bool(torch.allclose(stored.double(), ours, rtol=1e-4, atol=1e-8))


def check_schedule(settings: DDPMPytorchSettings, buffers: dict[str, torch.Tensor], path: Path) -> None:
    """The stated timesteps and beta schedule against the checkpoint's ``betas`` buffer."""
    stored = buffers.get("betas")
    if stored is None:
        return
    ours = make_betas(settings.schedule())
    if _matches(stored, ours):
        return
    if len(stored) != settings.timesteps:
        raise ConfigError(f"--timesteps {settings.timesteps} does not match {path}: its schedule has {len(stored)} steps")
    found = [name for name, kind in BETA_SCHEDULES.items()
             if _matches(stored, make_betas(ScheduleConfig(kind=kind, timesteps=settings.timesteps)))]
    hint = (f"they are the {found[0]} schedule's" if found
            else "they match no linear, cosine or sigmoid schedule with default settings")
    raise ConfigError(f"--beta-schedule {settings.beta_schedule} does not match the betas in {path} ({hint})")


def objectives_matching(settings: DDPMPytorchSettings, loss_weight: torch.Tensor) -> list[str]:
    """The objectives whose loss weights are ``loss_weight`` on the stated schedule: per objective,
    min(snr, gamma) times 1 / snr (pred_noise), 1 (pred_x0) or 1 / (snr + 1) (pred_v), for one gamma (none
    without min-SNR weighting)."""
    abar = torch.cumprod(1 - make_betas(settings.schedule()), 0)
    snr = abar / (1 - abar)
    lw = loss_weight.double()
    clipped = {"pred_noise": lw * snr, "pred_x0": lw, "pred_v": lw * (snr + 1)}  # each is min(snr, gamma) if right
    return [name for name, m in clipped.items()
            if m.shape == snr.shape and bool(torch.allclose(m, snr.clamp(max=float(m.max())), rtol=1e-4, atol=1e-12))]


def read_ddpm_pytorch(path: str | Path, settings: DDPMPytorchSettings, weights: str = "ema") -> ImportedModel:
    """The checkpoint at ``path`` with the stated ``settings``, checked and mapped onto difflab."""
    path = Path(path).expanduser()
    parts = checkpoint_parts(load_checkpoint(path), path, weights)
    notes = []
    if parts.version is not None and parts.version != LIBRARY_VERSION:
        notes.append(f"the checkpoint was written by denoising-diffusion-pytorch {parts.version}; unstated settings "
                     f"take {LIBRARY_VERSION}'s defaults")
    check_schedule(settings, parts.buffers, path)
    if "loss_weight" in parts.buffers and "betas" in parts.buffers:
        found = objectives_matching(settings, parts.buffers["loss_weight"])
        if found and settings.objective not in found:
            raise ConfigError(f"--objective {settings.objective} does not match the loss weights in {path} (they are "
                              f"{' or '.join(found)}'s)")
    else:
        notes.append(f"{path} has no schedule buffers (a bare Unet state dict): the stated timesteps, beta schedule "
                     "and objective are used unchecked")
    foreign = ForeignNetwork(kind=ForeignKind.DDPM_PYTORCH, ddpm_pytorch=settings.unet, image_size=settings.image_size,
                             source=str(path.resolve()))
    return ImportedModel(foreign=foreign, tensors=parts.unet, schedule=settings.schedule(), prediction=settings.prediction,
                         sampler=settings.sampler(), step=parts.step,
                         notes=[f"took the {parts.which} weights (step {parts.step})", *notes])


__all__ = ["DDPMPytorchSettings", "LIBRARY_VERSION", "checkpoint_parts", "load_checkpoint", "read_ddpm_pytorch",
           "read_settings_file", "settings_from"]
