"""The KL autoencoder of latent diffusion (Rombach et al. 2022, ``AutoencoderKL``) and its PatchGAN
discriminator, sized by :class:`~difflab.autoencoder.config.AENetConfig`.

Encoder: conv3x3 -> per level ``res_blocks`` ResBlocks then a stride-2 conv (none after the last level)
-> mid block (ResBlock, optional self-attention, ResBlock) -> GroupNorm, SiLU, conv3x3 to
``2 * latent_channels`` (the posterior's mean and log-variance, the latter clamped to [-30, 20] as LDM).
Decoder: the mirror image, with ``res_blocks + 1`` ResBlocks per level and nearest-neighbour 2x
upsampling followed by a conv3x3; its last conv is :attr:`Decoder.conv_out`, where the adaptive
discriminator weight compares gradient norms. Images are (N, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.autoencoder.config import AENetConfig
from difflab.errors import ConfigError

LOGVAR_RANGE = (-30.0, 20.0)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, twice, plus the input (through a 1x1 conv when the channels change)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (n, hw, c)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


def _mid(channels: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels), *([AttnBlock(channels)] if attention else []),
                         ResBlock(channels, channels))


class Encoder(nn.Module):
    """(N, 3, H, W) -> (N, 2 * latent_channels, H / downsample, W / downsample): mean and log-variance."""

    def __init__(self, cfg: AENetConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, cfg.channels(0), 3, padding=1)
        layers: list[nn.Module] = []
        ch = cfg.channels(0)
        for level in range(cfg.levels + 1):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(ch, cfg.channels(level)))
                ch = cfg.channels(level)
            if level < cfg.levels:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = _mid(ch, cfg.attention)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """(N, latent_channels, h, w) -> (N, out_channels, h * downsample, w * downsample), not clamped."""

    def __init__(self, cfg: AENetConfig, out_channels: int = 3) -> None:
        super().__init__()
        ch = cfg.channels(cfg.levels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _mid(ch, cfg.attention)
        layers: list[nn.Module] = []
        for level in reversed(range(cfg.levels + 1)):
            for _ in range(cfg.res_blocks + 1):
                layers.append(ResBlock(ch, cfg.channels(level)))
                ch = cfg.channels(level)
            if level > 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """The KL autoencoder: :meth:`encode` gives the diagonal Gaussian posterior q(z | x) as (mean,
    logvar) in float32, :meth:`decode` maps a latent back to an image."""

    def __init__(self, cfg: AENetConfig, channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, channels)
        self.decoder = Decoder(cfg, channels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) in [-1, 1] -> (mean, logvar), each (N, latent_channels, H / downsample, W / downsample)."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """z (N, latent_channels, h, w) -> x_hat (N, C, h * downsample, w * downsample), float32, not clamped."""
        return self.decoder(z).float()

    def sample(self, mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
        """The reparametrised posterior sample z = mean + std * noise."""
        return mean + torch.exp(0.5 * logvar) * noise

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        ds = self.cfg.downsample
        if image_size % ds:
            raise ConfigError(f"image size {image_size} is not a multiple of the autoencoder's downsample factor {ds}")
        return (self.cfg.latent_channels, image_size // ds, image_size // ds)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight, where the adaptive discriminator weight is measured."""
        return self.decoder.conv_out.weight


def kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent dimensions."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; LDM's ``NLayerDiscriminator`` with 3 layers): three stride-2 4x4
    convolutions, a stride-1 one, then a 1-channel logit map. GroupNorm instead of BatchNorm, so each
    example's logits depend on that example alone."""

    def __init__(self, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1, bias=False), _norm(2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1, bias=False), _norm(4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 8 * w, 3, padding=1, bias=False), _norm(8 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(8 * w, 1, 3, padding=1),
        )
        for m in self.modules():  # LDM's (pix2pix's) initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's hinge loss, 0.5 (E relu(1 - D(real)) + E relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """The autoencoder's adversarial loss, -E D(x_hat)."""
    return -fake_logits.float().mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """LDM's adaptive discriminator weight: ||d rec / d W|| / (||d gan / d W|| + 1e-4) at the decoder's
    last weight W, clamped to [0, 1e4] and detached (the graph is kept for the backward pass)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()
