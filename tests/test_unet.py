"""The UNet network, its config and presets (difflab.models)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from difflab.errors import ConfigError, DifflabError
from difflab.config import from_dict, to_dict
from difflab.models import PRESETS, BlockType, NormType, UNet, UNetConfig, unet_config
from difflab.models.layers import ChannelLayerNorm, LinearAttention, SelfAttention, make_norm, timestep_embedding

# Ho et al. 2020's CIFAR-10 model as counted in the original TF code (diffusion_tf), and as quoted by
# its PyTorch ports: 35,746,307 parameters ("35.7M" in the paper).
DDPM_CIFAR10_PARAMS = 35_746_307


def wake(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised weights random values, so that every parameter affects the output.

    A fresh UNet outputs exactly zero (its output conv starts at zero), which would make most
    behavioural checks vacuous.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def scaled_down(preset: str, size: int, **overrides) -> UNetConfig:
    """``preset`` at a smaller image size, with attention kept at the same levels."""
    cfg = PRESETS[preset]
    ratio = cfg.image_size // size
    return unet_config(
        preset,
        image_size=size,
        attention_resolutions=tuple(r // ratio for r in cfg.attention_resolutions),
        linear_attention_resolutions=tuple(r // ratio for r in cfg.linear_attention_resolutions),
        **overrides,
    )


def tiny(**overrides) -> UNet:
    return wake(UNet(unet_config("tiny", **overrides)))


# Variants of `tiny` covering every layer type: ConvNeXt blocks, linear attention, per-pixel LayerNorm.
VARIANTS = {
    "resnet": {},
    "convnext+linear": {"block": "convnext", "linear_attention_resolutions": (16,)},
    "resnet+layernorm": {"norm": "layer"},
    "resnet+group-channels": {"norm_group_channels": 8},
}


def images(batch: int, channels: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_maps_images_to_their_own_shape(preset, channels):
    size = 16 if preset != "ddpm-cifar10" else 8  # ddpm-cifar10 at 8 px: levels 8, 4, 2, 1
    model = wake(UNet(scaled_down(preset, size, in_channels=channels))).eval()
    x = images(2, channels, size)
    with torch.no_grad():
        out = model(x, torch.tensor([3.0, 700.5]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_tiny_preset_is_small():
    assert UNet(PRESETS["tiny"]).num_parameters() < 500_000


def test_ddpm_cifar10_has_the_papers_parameter_count():
    with torch.device("meta"):  # counting only: no memory, no init time
        model = UNet(PRESETS["ddpm-cifar10"])
    count = model.num_parameters()
    print(f"ddpm-cifar10: {count:,} parameters")
    assert abs(count - 35.7e6) / 35.7e6 < 0.01
    assert count == DDPM_CIFAR10_PARAMS


def test_fresh_network_outputs_zero():
    """The output conv is zero-initialised (DDPM's init_scale=0.), so the first prediction is 0."""
    model = UNet(PRESETS["tiny"]).eval()
    with torch.no_grad():
        out = model(images(2), 5.0)
    assert torch.count_nonzero(out) == 0


# -------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-no-dropout"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_does_not_depend_on_the_rest_of_the_batch(variant, train):
    """No layer mixes examples (GroupNorm/LayerNorm, not BatchNorm), in eval mode and in training."""
    model = tiny(dropout=0.0, **VARIANTS[variant]).train(train)
    x, t = images(4), torch.tensor([1.0, 250.0, 999.0, 42.5])
    with torch.no_grad():
        together = model(x, t)
        alone = model(x[2:3], t[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)


def test_timestep_changes_the_output_and_a_scalar_broadcasts():
    model = tiny().eval()
    x = images(2)
    with torch.no_grad():
        out_10 = model(x, torch.tensor([10.0, 10.0]))
        out_scalar = model(x, 10.0)
        out_frac = model(x, 10.5)
        out_500 = model(x, torch.tensor([500.0, 500.0]))
    torch.testing.assert_close(out_scalar, out_10)
    assert (out_10 - out_500).abs().max() > 1e-3
    assert (out_10 - out_frac).abs().max() > 1e-5  # fractional timesteps are not rounded


def test_timestep_embedding_is_the_ddpm_sinusoid():
    t = torch.tensor([0.0, 1.0, 17.25, 999.0])
    dim, half = 32, 16
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    # f_0 = 1 and f_{half-1} = 1/10000: sin and cos of t at both ends of the spectrum.
    torch.testing.assert_close(emb[:, 0], torch.sin(t))
    torch.testing.assert_close(emb[:, half], torch.cos(t))
    torch.testing.assert_close(emb[:, half - 1], torch.sin(t / 10000))
    torch.testing.assert_close(emb[:, dim - 1], torch.cos(t / 10000))
    i = 5
    torch.testing.assert_close(emb[:, i], torch.sin(t * 10000 ** (-i / (half - 1))))


def test_class_labels_condition_the_output():
    model = tiny(num_classes=10).eval()
    x = images(2)
    with torch.no_grad():
        cat = model(x, 100.0, torch.tensor([3, 3]))
        dog = model(x, 100.0, torch.tensor([5, 5]))
        null = model(x, 100.0, torch.tensor([-1, -1]))
        unconditional = model(x, 100.0)
    assert (cat - dog).abs().max() > 1e-3
    torch.testing.assert_close(unconditional, null)  # None means "not given", label -1
    with pytest.raises(DifflabError, match=r"-1 \.\. size-1"):
        model(x, 100.0, torch.tensor([3, 10]))
    with pytest.raises(DifflabError, match="integers of shape"):
        model(x, 100.0, torch.tensor([3.0, 1.0]))
    with pytest.raises(DifflabError, match="takes none"):
        tiny()(x, 100.0, torch.tensor([0, 1]))


def test_attribute_labels_and_text_condition_the_output():
    """Two attributes (each may be left out: -1), a pooled text vector and cross-attention tokens."""
    model = tiny(label_sizes=(3, 4), text_dim=6, cross_attention_resolutions=(8,)).eval()
    for p in model.parameters():  # wake the zero-initialised output layers
        torch.nn.init.normal_(p, std=0.3)
    x = images(2)
    g = torch.Generator().manual_seed(0)
    text, tokens = torch.randn(2, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        base = model(x, 100.0, torch.tensor([[0, 1], [2, 3]]))
        other_eyes = model(x, 100.0, torch.tensor([[0, 2], [2, 3]]))
        hair_only = model(x, 100.0, torch.tensor([[0, -1], [2, -1]]))
        with_text = model(x, 100.0, torch.tensor([[0, 1], [2, 3]]), text=text)
        zero_text = model(x, 100.0, torch.tensor([[0, 1], [2, 3]]), text=torch.zeros(2, 6))
        with_tokens = model(x, 100.0, text_tokens=tokens, text_mask=mask)
        masked_off = model(x, 100.0, text_tokens=tokens, text_mask=torch.zeros(2, 5, dtype=torch.bool))
        no_tokens = model(x, 100.0)
        changed = model(x, 100.0, text_tokens=torch.cat([tokens[:, :2], -tokens[:, 2:]], 1), text_mask=mask)
    assert (base[0] - other_eyes[0]).abs().max() > 1e-4 and torch.equal(base[1], other_eyes[1])  # per example
    assert (base - hair_only).abs().max() > 1e-4 and (base - with_text).abs().max() > 1e-4
    torch.testing.assert_close(zero_text, base)  # a zero text vector is "no text"
    assert (with_tokens - no_tokens).abs().max() > 1e-4
    torch.testing.assert_close(masked_off, no_tokens)  # masked tokens are not attended to
    torch.testing.assert_close(changed[1], with_tokens[1])  # example 1 sees only its first two tokens
    assert (changed[0] - with_tokens[0]).abs().max() > 1e-4
    with pytest.raises(DifflabError, match="no cross-attention"):
        tiny(text_dim=6)(x, 100.0, text_tokens=tokens)
    with pytest.raises(ConfigError, match="needs text_dim"):
        UNetConfig(cross_attention_resolutions=(8,))


def test_bad_inputs_raise_one_line_errors():
    model = tiny().eval()
    with pytest.raises(DifflabError, match=r"\(B, 3, H, W\)"):
        model(images(1, channels=1), 1.0)
    with pytest.raises(DifflabError, match="divisible by 2"):
        model(torch.randn(1, 3, 15, 16), 1.0)
    with pytest.raises(DifflabError, match=r"shape \(2,\)"):
        model(images(2), torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_gets_a_gradient(variant):
    model = tiny(label_sizes=(2, 3), text_dim=4, cross_attention_resolutions=(8,), **VARIANTS[variant]).train()
    g = torch.Generator().manual_seed(1)
    out = model(images(2), torch.tensor([5.0, 600.0]), torch.tensor([[0, 2], [1, -1]]), text=torch.randn(2, 4, generator=g),
                text_tokens=torch.randn(2, 3, 4, generator=g), text_mask=torch.tensor([[True, True, False], [True] * 3]))
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


# ------------------------------------------------------------------------------------ attention layers


def test_self_attention_matches_the_softmax_formula():
    torch.manual_seed(0)
    layer = wake(SelfAttention(channels=8, head_channels=4, norm=make_norm(NormType.GROUP, groups=2)))
    x = torch.randn(2, 8, 3, 5)
    tokens = layer.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = layer.qkv(tokens).chunk(3, dim=-1)
    heads = []
    for h in range(2):  # explicit per-head softmax(q k^T / sqrt(d)) v
        s = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ v[..., s])
    expected = x + layer.proj(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(layer(x), expected)


def test_linear_attention_equals_its_quadratic_form():
    """out_n = sum_m (q_n . k_m) v_m with q softmaxed over features and k over pixels (Shen et al.)."""
    torch.manual_seed(0)
    layer = wake(LinearAttention(channels=8, head_channels=4, norm=make_norm(NormType.GROUP, groups=2)))
    x = torch.randn(2, 8, 4, 4)
    tokens = layer.norm(x).flatten(2).transpose(1, 2)
    q, k, v = layer.qkv(tokens).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        qh = torch.softmax(q[..., s], dim=-1) * 4**-0.5
        kh = torch.softmax(k[..., s], dim=1)
        heads.append((qh @ kh.transpose(1, 2)) @ v[..., s])  # the N x N attention matrix, explicitly
    expected = x + layer.proj(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(2, 8, 4, 4)
    torch.testing.assert_close(layer(x), expected)


# ------------------------------------------------------------------------------- CPU speed paths


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_channels_last_and_bf16_autocast(variant):
    model = tiny(**VARIANTS[variant]).eval()
    x, t = images(2), torch.tensor([20.0, 800.0])
    with torch.no_grad():
        reference = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        out_cl = model_cl(x_cl, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x_cl, t)
    assert out_cl.shape == x.shape and out_bf16.shape == x.shape
    assert out_bf16.dtype == torch.float32  # the output comes back in the input's dtype
    assert torch.isfinite(out_cl).all() and torch.isfinite(out_bf16).all()
    torch.testing.assert_close(out_cl, reference, rtol=1e-4, atol=1e-4)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op); through ~20 layers we allow
    # a 5% relative L2 error against float32.
    rel = (out_bf16 - reference).norm() / reference.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.4f}"


# ------------------------------------------------------------------------------------------ config


ROUND_TRIP_CONFIGS = [
    *PRESETS.values(),
    UNetConfig(block="convnext", num_classes=10, linear_attention_resolutions=(32,), dropout=0),
    UNetConfig(label_sizes=(12, 10), text_dim=384, cross_attention_resolutions=(8, 16)),
    UNetConfig(norm="layer", norm_groups=7),
    UNetConfig(norm_group_channels=16),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP_CONFIGS, ids=[*PRESETS, "custom", "conditional", "layernorm", "group-channels"])
def test_config_round_trips_through_json(cfg):
    back = from_dict(UNetConfig, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg
    assert isinstance(back.channel_mults, tuple) and isinstance(back.attention_resolutions, tuple)
    assert isinstance(back.linear_attention_resolutions, tuple)
    assert isinstance(back.block, BlockType) and isinstance(back.dropout, float)
    assert isinstance(back.norm, NormType)


def test_layer_norm_replaces_every_group_norm():
    model = tiny(norm="layer")
    kinds = {type(m) for m in model.modules()}
    assert ChannelLayerNorm in kinds and torch.nn.GroupNorm not in kinds
    assert {type(m) for m in tiny().modules()} >= {torch.nn.GroupNorm}
    # A run saved before the field existed loads as GroupNorm, DDPM's choice.
    old = {k: v for k, v in to_dict(tiny().config).items() if k != "norm"}
    assert from_dict(UNetConfig, old).norm is NormType.GROUP


def test_group_channels_fix_the_group_size_not_the_group_count():
    model = UNet(unet_config("small", norm_group_channels=16))
    shapes = {(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    # small: 32 and 64 channels, decoder inputs of 96 and 128 (features + skip): 16 channels per group
    assert shapes == {(2, 32), (4, 64), (6, 96), (8, 128)}
    fixed = unet_config("small", norm_group_channels=0)  # back to a fixed count: norm_groups=8 everywhere
    assert {m.num_groups for m in UNet(fixed).modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    assert UNet(PRESETS["small"]).num_parameters() == UNet(fixed).num_parameters()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_layer_norm_normalises_each_pixel(layout):
    torch.manual_seed(0)
    layer = ChannelLayerNorm(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    x = (3 * torch.randn(2, 6, 4, 5) + 1).contiguous(memory_format=layout)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + layer.eps) * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected)


def test_config_normalises_lists_and_strings():
    cfg = UNetConfig(channel_mults=[1, 2, 2], attention_resolutions=[16], block="convnext")
    assert cfg.channel_mults == (1, 2, 2) and cfg.attention_resolutions == (16,)
    assert cfg.block is BlockType.CONVNEXT
    assert cfg == UNetConfig(channel_mults=(1, 2, 2), block=BlockType.CONVNEXT)


def test_presets_and_overrides():
    assert set(PRESETS) == {"tiny", "small", "default", "ddpm-cifar10"}
    cfg = unet_config("default", image_size=64)
    assert cfg.image_size == 64 and cfg.base_channels == 64 and cfg.channel_mults == (1, 2, 4)
    with pytest.raises(ConfigError, match="'tiny', 'small', 'default', 'ddpm-cifar10'"):
        unet_config("huge")
    with pytest.raises(ConfigError, match="unknown UNetConfig field.*'channels'"):
        unet_config("tiny", channels=8)
    with pytest.raises(ConfigError, match="unknown option config.width"):
        from_dict(UNetConfig, {"width": 3})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"in_channels": 0}, "in_channels must be an integer in 1..64"),
        ({"in_channels": 3.0}, "in_channels must be an integer in 1..64"),
        ({"image_size": 30}, "image_size=30 must be divisible by 4"),
        ({"norm_groups": 24}, "norm_groups=24 must divide base_channels=64"),
        ({"norm_group_channels": 24}, "norm_group_channels=24 must divide base_channels=64"),
        ({"norm_group_channels": -1}, "norm_group_channels must be >= 0"),
        ({"attention_resolutions": (12,)}, "attention_resolutions: 12 is not a feature-map size .* 32, 16, 8"),
        ({"linear_attention_resolutions": (64,)}, "linear_attention_resolutions: 64 is not"),
        ({"linear_attention_resolutions": (16,)}, r"both list \[16\]"),
        ({"block": "transformer"}, "unknown UNetConfig.block 'transformer'; choose one of 'resnet', 'convnext'"),
        ({"norm": "batch"}, "unknown UNetConfig.norm 'batch'; choose one of 'group', 'layer'"),
        ({"head_channels": 48}, "head_channels=48 must divide the 128 channels at resolution 16"),
        ({"head_channels": 256, "attention_resolutions": ()}, "head_channels=256 must divide the 128 .* middle"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
        ({"channel_mults": ()}, "channel_mults must have at least one entry"),
        ({"channel_mults": (1, 0)}, "channel_mults must hold integers >= 1"),
        ({"num_res_blocks": 0}, "num_res_blocks must be >= 1"),
        ({"base_channels": 64.0}, "base_channels must be an integer"),
        ({"image_size": True}, "image_size must be an integer"),
    ],
)
def test_invalid_configs_raise_clear_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        UNetConfig(**overrides)
    assert "\n" not in str(info.value)


def test_gradient_checkpointing_gives_the_same_gradients():
    """train.grad_checkpoint recomputes each level in the backward pass: same loss, same gradients
    (dropout included: the recomputation replays the random state), and only while training."""
    from difflab.models.unet import UNet, UNetConfig

    cfg = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                     head_channels=16, norm_groups=8, dropout=0.3)
    torch.manual_seed(0)
    a = UNet(cfg).train()
    for p in a.conv_out.parameters():
        torch.nn.init.normal_(p, std=0.1)  # so every layer gets a gradient
    b = UNet(cfg).train()
    b.load_state_dict(a.state_dict())
    b.grad_checkpoint = True
    x, t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([5.0, 50.0, 500.0])
    grads, calls = [], []
    for net in (a, b):
        seen, level = [], net.down[0]
        forward = level.forward
        level.forward = lambda *args, _f=forward, _seen=seen: _seen.append(1) or _f(*args)
        torch.manual_seed(7)
        loss = net(x, t).pow(2).mean()
        loss.backward()
        del level.forward
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        calls.append(len(seen))
    assert calls == [1, 2]  # checkpointed: the level runs again in the backward pass
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x, t), a.eval()(x, t))
