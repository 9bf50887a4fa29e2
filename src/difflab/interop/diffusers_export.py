"""Export a difflab run to diffusers (``difflab export --run R --diffusers OUT``).

``OUT`` becomes a diffusers pipeline folder, as ``DDPMPipeline.save_pretrained`` writes one::

    OUT/model_index.json                          DDPMPipeline (DDIMPipeline for a ddim run)
    OUT/unet/config.json                          UNet2DModel's configuration
    OUT/unet/diffusion_pytorch_model.safetensors  the run's EMA (or --weights model) weights
    OUT/scheduler/scheduler_config.json           the schedule, the prediction type and the run's sampler

so ``UNet2DModel.from_pretrained(OUT / "unet")``, ``DDPMScheduler.from_pretrained(OUT / "scheduler")`` (or the
scheduler class the file names) and ``DDPMPipeline.from_pretrained(OUT)`` load it. diffusers itself is not
needed to export.

difflab's UNet maps onto ``UNet2DModel`` block for block when it is built as diffusers builds its own:
residual blocks with GroupNorm of one group count everywhere (``model.norm_group_channels=0``), softmax
self-attention (``AttnDownBlock2D`` / ``AttnUpBlock2D`` at the listed resolutions, always in the middle), no
conditions. Then the time embedding is diffusers' with ``flip_sin_to_cos=False`` and ``freq_shift=1``, each
residual block is a ``ResnetBlock2D`` (``emb_proj`` -> ``time_emb_proj``, ``skip`` -> ``conv_shortcut``), each
attention layer an ``Attention`` whose ``to_q``/``to_k``/``to_v`` are the three thirds of difflab's fused
``qkv``. Anything else (ConvNeXt blocks, LayerNorm, GroupNorm with a fixed number of channels per group,
linear attention, labels, text, a super-resolution input, the EDM or x_prev parametrisations) is refused in
one line naming the field. An imported diffusers run exports its own configuration unchanged.

The schedule: linear, quadratic and cosine (s = 0.008, betas capped at 0.999) schedules by name
(``linear``, ``scaled_linear``, ``squaredcos_cap_v2``; difflab's beta range is stated for T = 1000, diffusers'
for T itself), every other schedule as its explicit ``trained_betas``. The scheduler's class follows the
run's ``[sampler]`` (ddpm -> DDPMScheduler, ddim -> DDIMScheduler, dpmpp-* -> DPMSolverMultistepScheduler,
euler/heun -> Euler/HeunDiscreteScheduler), with x0 clipping to [-1, 1] where the class has it (difflab's
sampling default) and the ``trailing`` timestep spacing (every step goes to the next grid point, the first
call at t = T - 1, as in difflab's grids).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from difflab.config import RunConfig, to_dict
from difflab.errors import CheckpointError, ConfigError, parse_choice
from difflab.io import atomic_path, atomic_write_json
from difflab.models.diffusers_unet import DIFFUSERS_VERSION, DiffusersUNet2DConfig
from difflab.models.foreign import ForeignKind
from difflab.models.layers import Downsample, NormType, ResBlock, SelfAttention, Upsample
from difflab.models.unet import BlockType, UNet, UNetConfig
from difflab.parametrization import Prediction
from difflab.runs import Weights
from difflab.samplers import SamplerKind
from difflab.schedule import BetaSchedule, ScheduleConfig, VarianceType
from difflab.train.checkpoint import CONFIG, latest_checkpoint, load_weights, require_run

PREDICTION_TYPES = {Prediction.EPS: "epsilon", Prediction.V: "v_prediction", Prediction.X0: "sample"}
_DPMPP = {SamplerKind.DPMPP_2M: ("dpmsolver++", 2), SamplerKind.DPMPP_2M_SDE: ("sde-dpmsolver++", 2),
          SamplerKind.DPMPP_3M: ("dpmsolver++", 3), SamplerKind.DPMPP_3M_SDE: ("sde-dpmsolver++", 3)}


def _no_equivalent(setting: str) -> ConfigError:
    return ConfigError(f"{setting} has no diffusers equivalent; the run cannot be exported to diffusers")


# -- the network -------------------------------------------------------------------------------------------
def diffusers_config(m: UNetConfig) -> DiffusersUNet2DConfig:
    """The ``UNet2DModel`` configuration that computes what difflab's UNet of ``m`` computes, or one ConfigError
    naming the first field that has no diffusers equivalent."""
    widths = [m.base_channels * k for k in m.channel_mults]
    if m.block is not BlockType.RESNET:
        raise _no_equivalent(f"model.block={m.block.value} (UNet2DModel's blocks are residual blocks)")
    if m.norm is not NormType.GROUP:
        raise _no_equivalent(f"model.norm={m.norm.value} (UNet2DModel normalises with GroupNorm)")
    if m.norm_group_channels:
        raise _no_equivalent(f"model.norm_group_channels={m.norm_group_channels} (GroupNorm of {m.norm_group_channels} "
                             "channels per group, so more groups in wider layers, where UNet2DModel has one group count, "
                             "norm_num_groups; runs with model.norm_group_channels=0 export)")
    for name in ("linear_attention_resolutions", "cross_attention_resolutions", "label_sizes"):
        if getattr(m, name):
            raise _no_equivalent(f"model.{name}={','.join(map(str, getattr(m, name)))}")
    for name in ("num_classes", "text_dim", "cond_channels"):
        if getattr(m, name):
            raise _no_equivalent(f"model.{name}={getattr(m, name)}")
    attn = [res in m.attention_resolutions for res in m.resolutions]
    return DiffusersUNet2DConfig(
        sample_size=m.image_size, in_channels=m.in_channels, out_channels=m.in_channels,
        flip_sin_to_cos=False, freq_shift=1,  # difflab's sinusoids: sines first, frequencies 1 .. 1e-4 over dim/2 - 1
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(widths), layers_per_block=m.num_res_blocks, dropout=m.dropout,
        attention_head_dim=m.head_channels, norm_num_groups=m.norm_groups, norm_eps=1e-5,
    )


def _put(out: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module) -> None:
    for name, tensor in module.state_dict().items():
        out[f"{prefix}.{name}"] = tensor


def _resnet(out: dict[str, torch.Tensor], prefix: str, block: torch.nn.Module) -> None:
    assert isinstance(block, ResBlock)
    for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
                         ("conv2", "conv2"), ("skip", "conv_shortcut")):
        _put(out, f"{prefix}.{theirs}", getattr(block, ours))  # an identity skip has no tensors


def _attention(out: dict[str, torch.Tensor], prefix: str, layer: torch.nn.Module) -> None:
    assert isinstance(layer, SelfAttention)
    _put(out, f"{prefix}.group_norm", layer.norm)
    for part, weight, bias in zip(("to_q", "to_k", "to_v"), layer.qkv.weight.chunk(3), layer.qkv.bias.chunk(3)):
        out[f"{prefix}.{part}.weight"], out[f"{prefix}.{part}.bias"] = weight, bias
    _put(out, f"{prefix}.to_out.0", layer.proj)


def _layers(stage: torch.nn.Module) -> list[torch.nn.Module]:
    assert isinstance(stage, torch.nn.Sequential)
    return list(stage)


def diffusers_state_dict(net: UNet) -> dict[str, torch.Tensor]:
    """difflab's UNet weights under UNet2DModel's names (for a config :func:`diffusers_config` accepts)."""
    c = net.config
    out: dict[str, torch.Tensor] = {}
    _put(out, "time_embedding.linear_1", net.time_embed[0])
    _put(out, "time_embedding.linear_2", net.time_embed[2])
    _put(out, "conv_in", net.conv_in)
    down = iter(net.down)
    last = len(c.channel_mults) - 1
    for level in range(last + 1):
        for j in range(c.num_res_blocks):
            stage = _layers(next(down))
            _resnet(out, f"down_blocks.{level}.resnets.{j}", stage[0])
            if len(stage) > 1:
                _attention(out, f"down_blocks.{level}.attentions.{j}", stage[1])
        if level != last:
            resample = _layers(next(down))[0]
            assert isinstance(resample, Downsample)
            _put(out, f"down_blocks.{level}.downsamplers.0.conv", resample.conv)
    middle = _layers(net.middle)
    _resnet(out, "mid_block.resnets.0", middle[0])
    _attention(out, "mid_block.attentions.0", middle[1])
    _resnet(out, "mid_block.resnets.1", middle[2])
    up = iter(net.up)
    for i in range(last + 1):
        for j in range(c.num_res_blocks + 1):
            stage = _layers(next(up))
            _resnet(out, f"up_blocks.{i}.resnets.{j}", stage[0])
            for layer in stage[1:]:
                if isinstance(layer, SelfAttention):
                    _attention(out, f"up_blocks.{i}.attentions.{j}", layer)
                elif isinstance(layer, Upsample):
                    _put(out, f"up_blocks.{i}.upsamplers.0.conv", layer.conv)
    _put(out, "conv_norm_out", net.norm_out)
    _put(out, "conv_out", net.conv_out)
    return out


# -- the scheduler -------------------------------------------------------------------------------------------
def _betas(s: ScheduleConfig) -> dict[str, Any]:
    T = s.timesteps
    named = {BetaSchedule.LINEAR: "linear", BetaSchedule.QUADRATIC: "scaled_linear"}
    if not s.betas and s.kind in named:
        return {"beta_schedule": named[s.kind], "beta_start": s.beta_start * 1000 / T, "beta_end": s.beta_end * 1000 / T,
                "trained_betas": None}
    if not s.betas and s.kind is BetaSchedule.COSINE and (s.cosine_s, s.max_beta) == (0.008, 0.999):
        return {"beta_schedule": "squaredcos_cap_v2", "trained_betas": None}
    from difflab.schedule import make_betas

    return {"beta_schedule": "linear", "trained_betas": make_betas(s).tolist()}


def scheduler_config(cfg: RunConfig) -> dict[str, Any]:
    """The diffusers scheduler config of a run: its schedule, prediction type and a class matching its sampler."""
    prediction = PREDICTION_TYPES.get(cfg.loss.prediction)
    if prediction is None:
        raise _no_equivalent(f"loss.prediction={cfg.loss.prediction.value} (diffusers schedulers read epsilon, "
                             "v_prediction or sample)")
    sampler = cfg.sampler
    common: dict[str, Any] = {"num_train_timesteps": cfg.schedule.timesteps, **_betas(cfg.schedule),
                              "prediction_type": prediction, "timestep_spacing": "trailing", "steps_offset": 0}
    clip = {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False}
    if sampler.sampler is SamplerKind.DDIM:
        return {"_class_name": "DDIMScheduler", **common, **clip, "set_alpha_to_one": True}
    if sampler.sampler in _DPMPP:
        algorithm, order = _DPMPP[sampler.sampler]
        return {"_class_name": "DPMSolverMultistepScheduler", **common, "algorithm_type": algorithm, "solver_order": order,
                "thresholding": False, "lower_order_final": True, "final_sigmas_type": "zero"}
    if sampler.sampler in (SamplerKind.EULER, SamplerKind.HEUN):
        name = "EulerDiscreteScheduler" if sampler.sampler is SamplerKind.EULER else "HeunDiscreteScheduler"
        return {"_class_name": name, **common}
    variance = "fixed_large" if sampler.variance is VarianceType.FIXED_LARGE else "fixed_small"
    return {"_class_name": "DDPMScheduler", **common, **clip, "variance_type": variance}


# -- the folder ------------------------------------------------------------------------------------------------
def export_diffusers(run_dir: str | Path, out: str | Path, weights: Weights | str = Weights.EMA) -> Path:
    """Write the run as a diffusers pipeline folder ``out`` (see the module docstring); returns ``out``."""
    weights = parse_choice(Weights, weights, "--weights")
    run = require_run(run_dir)
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        what = "is a file" if not target.is_dir() else "is not empty"
        raise ConfigError(f"--diffusers {target} {what}; give a new folder for the diffusers model")
    cfg = RunConfig.load(run / CONFIG)
    if cfg.upscale.active:
        raise _no_equivalent(f"upscale.from_size={cfg.upscale.from_size} (a super-resolution run)")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"--run {run}: no checkpoint has been saved yet")
    source = ckpt.path / f"{weights.value}.safetensors"
    tensors = ckpt.tensors(weights.value)
    f = cfg.foreign
    if f is not None and f.kind is not ForeignKind.DIFFUSERS_UNET2D:
        raise _no_equivalent(f"foreign.kind={f.kind.value} (the run's network is a {f.label})")
    if f is not None:
        assert f.diffusers is not None
        unet_cfg = f.diffusers
        state = {k.removeprefix("unet."): v for k, v in tensors.items()}
    else:
        unet_cfg = diffusers_config(cfg.model)
        net = UNet(cfg.model)
        load_weights(net, tensors, source, run / CONFIG)
        state = diffusers_state_dict(net)
    scheduler = scheduler_config(cfg)
    pipeline = "DDIMPipeline" if scheduler["_class_name"] == "DDIMScheduler" else "DDPMPipeline"
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    atomic_write_json(target / "unet" / "config.json", {"_class_name": "UNet2DModel", **version, **to_dict(unet_cfg)})
    with atomic_path(target / "unet" / "diffusion_pytorch_model.safetensors") as tmp:
        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_json(target / "scheduler" / "scheduler_config.json", {**scheduler, **version})
    atomic_write_json(target / "model_index.json", {"_class_name": pipeline, **version,
                                                    "scheduler": ["diffusers", scheduler["_class_name"]],
                                                    "unet": ["diffusers", "UNet2DModel"]})
    return target


__all__ = ["diffusers_config", "diffusers_state_dict", "export_diffusers", "scheduler_config"]
