"""A compact StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN").

* Mapping network: z (normalised to unit RMS) -> w through ``mapping_layers`` fully connected layers at
  a 100x lower learning rate; a running mean ``w_avg`` (a buffer) for the truncation trick.
* Synthesis: a learned 4x4 constant, then per resolution 4 -> 8 -> ... -> size a bilinear 2x upsampling
  and two modulated 3x3 convolutions (one at 4x4), each followed by a per-pixel noise input with a
  learned strength, a bias and a leaky ReLU; skip architecture: every resolution adds a toRGB (a
  modulated 1x1 convolution, not demodulated) to the upsampled image so far.
* Modulated convolution (:func:`modulated_conv2d`): the weight is scaled per input channel by a style
  (an affine map of w) and, with demodulation, renormalised per output channel so that a unit-variance
  input gives a unit-variance output. Computed unfused (scale the input, one shared convolution,
  scale the output), which equals the grouped-convolution form and is faster on a CPU.
* Style mixing: with probability ``style_mixing`` the layers from a random cut-off on take the style of
  a second latent.
* Discriminator (:class:`Discriminator`): residual, fromRGB at full resolution, one residual block per
  halving down to 4x4, then minibatch standard deviation, a 3x3 convolution and two dense layers. With
  ``t_dim`` > 0 it is time-conditioned (used by the denoising-diffusion GAN): an embedding of t is
  added to every block.

All layers use the equalised learning rate (weights drawn N(0, 1), scaled by 1/sqrt(fan_in) at run
time). Randomness comes from per-image generators (:func:`draw_latents`), so an image depends on its
seed alone, not on the batch it is drawn in.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.gan.config import GANNetConfig
from difflab.models.layers import timestep_embedding
from difflab.samplers.noise import randn

SQRT2 = math.sqrt(2.0)


def lrelu(x: Tensor) -> Tensor:
    """Leaky ReLU (0.2) with StyleGAN's gain sqrt(2), which keeps activations near unit variance."""
    return F.leaky_relu(x, 0.2) * SQRT2


class EqualLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain, self.lr_mul = lr_mul / math.sqrt(in_features), lr_mul

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, eps: float = 1e-8) -> Tensor:
    """The convolution of ``x`` (B, I, H, W) with ``weight`` (O, I, k, k) modulated per image by
    ``styles`` (B, I): w'_{b,o,i} = s_{b,i} w_{o,i}, and with ``demodulate`` divided by
    sqrt(sum_{i,k} w'^2 + eps) for each (b, o), so that an input of i.i.d. unit-variance pixels gives
    outputs of unit variance (StyleGAN2, eqs. 1-3). 'Same' padding."""
    out = F.conv2d(x * styles[:, :, None, None], weight, padding=weight.shape[-1] // 2)
    if demodulate:
        # sum_{i,k} (s_i w_oik)^2 = sum_i s_i^2 (sum_k w_oik^2), for every image at once
        dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + eps).rsqrt()  # (B, O)
        out = out * dcoefs[:, :, None, None]
    return out


class ModulatedConv2d(nn.Module):
    """A modulated convolution whose styles are an affine map of w (bias initialised to 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, demodulate: bool = True) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.demodulate = demodulate

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w)
        if not self.demodulate:  # toRGB: the weight gain goes into the styles (StyleGAN2's ToRGBLayer)
            return modulated_conv2d(x, self.weight, styles * self.weight_gain, demodulate=False)
        return modulated_conv2d(x, self.weight, styles, demodulate=True)


class MappingNetwork(nn.Module):
    w_avg: Tensor

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float = 0.01) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.layers = nn.ModuleList(EqualLinear(a, b, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, update_w_avg: bool = False, beta: float = 0.995) -> Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for layer in self.layers:
            x = lrelu(layer(x))
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, beta))
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, up: bool) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.up = up

    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv(x, w) + noise * self.noise_strength
        return lrelu(x + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


def resolutions(size: int) -> list[int]:
    """4, 8, ..., size."""
    return [2**k for k in range(2, int(math.log2(size)) + 1)]


class StyleGenerator(nn.Module):
    """z (B, z_dim) and per-layer noise -> images (B, C, size, size), roughly in [-1, 1] (not clamped)."""

    def __init__(self, net: GANNetConfig, size: int, channels: int) -> None:
        super().__init__()
        self.z_dim, self.size, self.channels = net.z_dim, size, channels
        self.mapping = MappingNetwork(net.z_dim, net.w_dim, net.mapping_layers)
        res = resolutions(size)
        ch = [net.channels_at(r, size) for r in res]
        self.const = nn.Parameter(torch.randn(ch[0], 4, 4))
        self.layers = nn.ModuleList([SynthesisLayer(ch[0], ch[0], net.w_dim, up=False)])
        self.torgb = nn.ModuleList([ToRGB(ch[0], channels, net.w_dim)])
        self.noise_res = [4]
        for i in range(1, len(res)):
            self.layers.append(SynthesisLayer(ch[i - 1], ch[i], net.w_dim, up=True))
            self.layers.append(SynthesisLayer(ch[i], ch[i], net.w_dim, up=False))
            self.torgb.append(ToRGB(ch[i], channels, net.w_dim))
            self.noise_res += [res[i], res[i]]
        # StyleGAN2's w indexing: the layers take w[0], w[1], ...; a toRGB shares the index of the
        # next resolution's first layer, so there are 2 log2(size) - 2 of them
        self.num_ws = len(self.layers) + 1

    # -- randomness: every draw of an image from its own generator ----------------------------
    def draw_latents(self, gens: Sequence[torch.Generator], device: torch.device | str = "cpu",
                     mixing: float = 0.0) -> dict[str, Tensor]:
        """z, the noise maps and (``mixing`` > 0) a second latent and the layer from which it takes over
        (``num_ws`` = no mixing), drawn image by image from ``gens``."""
        n = len(gens)
        out = {"z": randn((n, self.z_dim), gens, device=device)}
        for i, r in enumerate(self.noise_res):
            out[f"noise{i}"] = randn((n, 1, r, r), gens, device=device)
        if mixing > 0:
            out["z_mix"] = randn((n, self.z_dim), gens, device=device)
            u = torch.stack([torch.rand((), generator=g) for g in gens])
            cut = torch.stack([torch.randint(1, self.num_ws, (), generator=g) for g in gens])
            out["mix_cutoff"] = torch.where(u < mixing, cut, torch.full_like(cut, self.num_ws)).to(device)
        return out

    def ws(self, z: Tensor, *, psi: float = 1.0, z_mix: Tensor | None = None, mix_cutoff: Tensor | None = None,
           update_w_avg: bool = False) -> Tensor:
        """(B, num_ws, w_dim): the per-layer styles, with style mixing and truncation toward w_avg."""
        w = self.mapping(z, update_w_avg=update_w_avg)[:, None].expand(-1, self.num_ws, -1)
        if z_mix is not None and mix_cutoff is not None:
            w2 = self.mapping(z_mix)[:, None].expand(-1, self.num_ws, -1)
            layer = torch.arange(self.num_ws, device=z.device)
            w = torch.where((layer[None, :] >= mix_cutoff[:, None])[:, :, None], w2, w)
        if psi != 1:  # in w_avg's dtype: under autocast the mapping's output is bf16
            w = self.mapping.w_avg.lerp(w.to(self.mapping.w_avg.dtype), psi)
        return w

    def synthesis(self, ws: Tensor, noise: Sequence[Tensor]) -> Tensor:
        # channels_last: the layout the CPU's (oneDNN) and GPU's convolutions are fastest in
        x = self.const[None].expand(ws.shape[0], -1, -1, -1).contiguous(memory_format=torch.channels_last)
        x = self.layers[0](x, ws[:, 0], noise[0])
        img = self.torgb[0](x, ws[:, 1])
        for k in range(1, len(self.torgb)):
            i = 2 * k - 1
            x = self.layers[i](x, ws[:, i], noise[i])
            x = self.layers[i + 1](x, ws[:, i + 1], noise[i + 1])
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + self.torgb[k](x, ws[:, i + 2])
        return img

    def forward(self, z: Tensor, *, psi: float = 1.0, update_w_avg: bool = False, z_mix: Tensor | None = None,
                mix_cutoff: Tensor | None = None, **noise: Tensor) -> Tensor:
        ws = self.ws(z, psi=psi, z_mix=z_mix, mix_cutoff=mix_cutoff, update_w_avg=update_w_avg)
        return self.synthesis(ws, [noise[f"noise{i}"] for i in range(len(self.noise_res))])


def minibatch_stddev(x: Tensor, group: int) -> Tensor:
    """Append one feature map: the standard deviation of each feature over groups of ``group`` images
    (averaged over features and pixels), so D can see a lack of variety. The group is the largest
    divisor of the batch not above ``group``."""
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group, n) + 1) if n % d == 0)
    y = x.reshape(g, n // g, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // g,)
    y = y.reshape(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


class DBlock(nn.Module):
    """A 3x3 convolution, a 2x average pooling and a 3x3 convolution at the lower resolution (StyleGAN2
    downsamples inside its second convolution too), plus a pooled 1x1 skip; (main + skip) / sqrt 2."""

    def __init__(self, in_channels: int, out_channels: int, t_dim: int = 0) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)
        self.temb = EqualLinear(t_dim, in_channels) if t_dim else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        skip = self.skip(F.avg_pool2d(x, 2))
        h = lrelu(self.conv0(x))
        if self.temb is not None and temb is not None:
            h = h + self.temb(temb)[:, :, None, None]
        h = lrelu(self.conv1(F.avg_pool2d(h, 2)))
        return (h + skip) / SQRT2


class Discriminator(nn.Module):
    """Images (B, in_channels, size, size) -> logits (B,). ``t_dim`` > 0: conditioned on integer
    timesteps t (B,) too."""

    def __init__(self, net: GANNetConfig, size: int, in_channels: int, t_dim: int = 0) -> None:
        super().__init__()
        res = resolutions(size)[::-1]  # size, ..., 4
        ch = [net.channels_at(r, size) for r in res]
        self.from_rgb = EqualConv2d(in_channels, ch[0], 1)
        self.blocks = nn.ModuleList(DBlock(ch[i], ch[i + 1], t_dim) for i in range(len(res) - 1))
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(EqualLinear(t_dim, t_dim), nn.LeakyReLU(0.2), EqualLinear(t_dim, t_dim)) if t_dim else None
        self.mbstd_group = net.mbstd_group
        c = ch[-1]
        self.conv = EqualConv2d(c + 1, c, 3)
        self.fc = EqualLinear(c * 16, c)
        self.out = EqualLinear(c, 1)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        temb = None
        if self.t_mlp is not None:
            if t is None:
                raise ValueError("this discriminator is time-conditioned: give t")
            temb = self.t_mlp(timestep_embedding(t.to(x.device), self.t_dim))
        h = lrelu(self.from_rgb(x.contiguous(memory_format=torch.channels_last)))
        for block in self.blocks:
            h = block(h, temb)
        h = lrelu(self.conv(minibatch_stddev(h, self.mbstd_group)))
        return self.out(lrelu(self.fc(h.flatten(1)))).squeeze(1)
