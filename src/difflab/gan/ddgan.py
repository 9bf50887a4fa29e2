"""The denoising-diffusion GAN (Xiao, Kreis and Vahdat 2022, "Tackling the Generative Learning
Trilemma with Denoising Diffusion GANs").

A diffusion process of few steps (T = 2 or 4, on :class:`difflab.schedule.NoiseSchedule`, whose
timesteps are 0-based: level t = 0 is the first noising step, and the level below it is the data)
whose reverse steps are large, so their true denoising distribution q(x_{t-1} | x_t) is multimodal and
is learned adversarially, per step:

* the generator maps (x_t, t, z) to a clean image x0_hat (:class:`DDGANGenerator`), and the step's
  sample is the forward process's posterior q(x_{t-1} | x_t, x_0 = x0_hat) (:func:`posterior_step`,
  the paper's eq. 8; at t = 0 that is x0_hat itself);
* the discriminator D(x_{t-1}, x_t, t) tells real pairs, x_t ~ q(x_t | x_0) then
  x_{t-1} ~ q(x_{t-1} | x_t, x_0) (together a draw of q(x_{t-1}, x_t | x_0)), from fake ones,
  x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) on the same x_t;
* sampling starts from x_{T-1} ~ N(0, I) and makes exactly T generator calls (:func:`render`).

The generator is a small U-Net whose convolutions are StyleGAN2's modulated convolutions, modulated
by w(z) + an embedding of t (the paper's NCSN++ takes z through AdaGN; the role is the same).
The posterior mean and variance come from the schedule's tables
(``posterior_mean_coef1/2``, ``posterior_variance``, built by :func:`difflab.schedule.posterior`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.gan.config import GANNetConfig
from difflab.gan.stylegan import SQRT2, EqualConv2d, EqualLinear, MappingNetwork, ModulatedConv2d, lrelu, resolutions
from difflab.models.layers import timestep_embedding
from difflab.samplers.noise import randn
from difflab.schedule import NoiseSchedule, broadcast_to


def posterior_step(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """A draw of q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t) with the given standard
    normal ``noise``, for integer levels ``t`` (B,); at t = 0 (variance 0) the result is x_0."""
    t = t.long().cpu()
    coef_x0, coef_xt, variance = (torch.as_tensor(v)[t] for v in (
        schedule.posterior_mean_coef1, schedule.posterior_mean_coef2, schedule.posterior_variance))
    mean = broadcast_to(coef_x0, x_t) * x0 + broadcast_to(coef_xt, x_t) * x_t
    return mean + broadcast_to(variance.sqrt(), x_t) * noise


def reverse_step(generator: Callable[[Tensor, Tensor, Tensor], Tensor], schedule: NoiseSchedule, x_t: Tensor,
                 t: Tensor, z: Tensor, noise: Tensor) -> Tensor:
    """One step of the DDGAN reverse chain: x0_hat = generator(x_t, t, z), then
    x_{t-1} ~ q(x_{t-1} | x_t, x_0 = x0_hat) with the standard normal ``noise``."""
    return posterior_step(schedule, generator(x_t, t, z), x_t, t, noise)


def training_pairs(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise_t: Tensor, noise_prev: Tensor) -> tuple[Tensor, Tensor]:
    """A real pair (x_{t-1}, x_t) ~ q(x_{t-1}, x_t | x_0): x_t from the forward marginal, then x_{t-1}
    from the posterior (the same joint as the forward chain x_{t-1} -> x_t; at t = 0, x_{t-1} = x_0)."""
    x_t = schedule.q_sample(x0, t.to(x0.device), noise_t)
    return posterior_step(schedule, x0, x_t, t, noise_prev), x_t


class ModResBlock(nn.Module):
    """Two modulated 3x3 convolutions with biases and leaky ReLUs, plus a 1x1 skip; (main + skip) / sqrt 2."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv0 = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.conv1 = ModulatedConv2d(out_channels, out_channels, 3, w_dim)
        self.bias0 = nn.Parameter(torch.zeros(out_channels))
        self.bias1 = nn.Parameter(torch.zeros(out_channels))
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        h = lrelu(self.conv0(x, w) + self.bias0[None, :, None, None])
        h = lrelu(self.conv1(h, w) + self.bias1[None, :, None, None])
        return (h + (x if self.skip is None else self.skip(x))) / SQRT2


class DDGANGenerator(nn.Module):
    """(x_t (B, C, size, size), integer t (B,), z (B, z_dim)) -> x0_hat in [-1, 1] (tanh)."""

    def __init__(self, net: GANNetConfig, size: int, channels: int, steps: int) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.size, self.channels, self.steps = net.z_dim, net.w_dim, size, channels, steps
        self.mapping = MappingNetwork(net.z_dim, net.w_dim, net.mapping_layers)
        self.t_mlp = nn.Sequential(EqualLinear(net.w_dim, net.w_dim), nn.LeakyReLU(0.2), EqualLinear(net.w_dim, net.w_dim))
        res = resolutions(size)[::-1]  # size, ..., 4
        ch = [net.channels_at(r, size) for r in res]
        self.inp = EqualConv2d(channels, ch[0], 3)
        self.down = nn.ModuleList(ModResBlock(ch[max(i - 1, 0)], ch[i], net.w_dim) for i in range(len(res)))
        self.up = nn.ModuleList(ModResBlock(ch[i + 1] + ch[i], ch[i], net.w_dim) for i in reversed(range(len(res) - 1)))
        self.out = EqualConv2d(ch[0], channels, 3)

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        w = self.mapping(z) + self.t_mlp(timestep_embedding(t.to(x_t.device), self.w_dim))
        h = self.inp(x_t.contiguous(memory_format=torch.channels_last))
        skips = []
        for i, block in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h, w)
            skips.append(h)
        skips.pop()  # the 4x4 output is h itself
        for block in self.up:
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skips.pop()], dim=1), w)
        return torch.tanh(self.out(h))


# -- sampling -------------------------------------------------------------------------------
def draw_latents(gens: Sequence[torch.Generator], shape: Sequence[int], z_dim: int, steps: int,
                 device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Every Gaussian of a sample, image by image from ``gens``: x_{T-1}, one z per step (B, T, z_dim,
    step T-1 first) and the posterior noise of the T - 1 steps above t = 0 (B, T - 1, C, H, W)."""
    n = len(gens)
    return {"x": randn((n, *shape), gens, device=device),
            "z": randn((n, steps, z_dim), gens, device=device),
            "eps": randn((n, steps - 1, *shape), gens, device=device)}


def render(generator: Callable[[Tensor, Tensor, Tensor], Tensor], schedule: NoiseSchedule,
           latents: dict[str, Tensor]) -> Tensor:
    """The reverse chain from x_{T-1} to x_0: exactly T calls of ``generator(x_t, t, z)``, each
    followed by the posterior step."""
    x, T = latents["x"], schedule.num_timesteps
    for i, level in enumerate(range(T - 1, -1, -1)):
        t = torch.full((x.shape[0],), level, dtype=torch.long)
        noise = latents["eps"][:, i] if level > 0 else torch.zeros_like(x)
        x = reverse_step(generator, schedule, x, t, latents["z"][:, i], noise)
    return x


def slerp(a: Tensor, b: Tensor, frac: float) -> Tensor:
    """Spherical interpolation per image (rows of the flattened tensors), which keeps the norm of
    Gaussian latents typical along the way."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)[:, None]
    so = torch.sin(omega)
    out = torch.sin((1 - frac) * omega) / so * fa + torch.sin(frac * omega) / so * fb
    return out.reshape(a.shape)

