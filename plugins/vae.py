"""A conditional VAE (Kingma & Welling 2014; conditioned as in Sohn et al. 2015, "Learning
Structured Output Representation using Deep Conditional Generative Models").

The latent is spatial, [latent_channels, H / 2^downs, W / 2^downs], so the same network is
the autoencoder of a latent-diffusion setup (Rombach et al. 2022); without a prompt
(cond=None) it is an ordinary autoencoder. The prompt vector modulates every GroupNorm
(FiLM) on both sides, through the fused group_norm_silu entry point, and is also drawn by
an MLP into a feature map at the decoder's input (as DCGAN's stem maps its input to a 4x4
map): FiLM is the same at every pixel, so without that map the only place a sample's layout
could come from is its random latent, and "at the top left" would land anywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.kernels import group_norm_silu
from limner.protocols import TextEmbedding


class FiLMResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the prompt vector scales and shifts the second norm."""

    def __init__(self, ch: int, text_dim: int, groups: int = 8):
        super().__init__()
        self.groups = groups
        self.norm1, self.norm2 = nn.GroupNorm(groups, ch), nn.GroupNorm(groups, ch)
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(text_dim, 2 * ch)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm_silu(x, self.groups, self.norm1.weight, self.norm1.bias))
        scale, shift = self.film(t).chunk(2, dim=1)
        h = group_norm_silu(h, self.groups, self.norm2.weight, self.norm2.bias, scale=scale, shift=shift)
        return x + self.conv2(h)


class ConditionalVAE(nn.Module):
    """encode(x, cond) -> (mean, logvar); decode(z, cond) -> image; forward = decode (G(z, cond))."""

    def __init__(self, context_dim: int, channels: int, image_size: int, latent_channels: int, width: int,
                 downs: int, text_dim: int):
        super().__init__()
        if image_size % 2**downs:
            raise limner.LimnerError(f"vae: image_size {image_size} is not divisible by 2^downs = {2**downs}")
        self.context_dim = context_dim
        self.z_shape = (latent_channels, image_size // 2**downs, image_size // 2**downs)
        self.text = nn.Sequential(nn.Linear(context_dim, text_dim), nn.SiLU())
        self.enc_in = nn.Conv2d(channels, width, 3, padding=1)
        self.enc_blocks = nn.ModuleList(FiLMResBlock(width, text_dim) for _ in range(downs))
        self.enc_downs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(downs))
        self.enc_out = nn.Conv2d(width, 2 * latent_channels, 1)
        self.dec_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.layout = nn.Sequential(nn.Linear(context_dim, text_dim), nn.SiLU(),
                                    nn.Linear(text_dim, width * self.z_shape[1] * self.z_shape[2]),
                                    nn.Unflatten(1, (width, *self.z_shape[1:])))
        self.dec_blocks = nn.ModuleList(FiLMResBlock(width, text_dim) for _ in range(downs))
        self.dec_ups = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(downs))
        self.dec_out = nn.Conv2d(width, channels, 3, padding=1)

    def _text(self, cond: TextEmbedding | None, like: torch.Tensor) -> torch.Tensor:
        pooled = like.new_zeros(like.shape[0], self.context_dim) if cond is None else cond.pooled.to(like.dtype)
        return self.text(pooled)

    def encode(self, x: torch.Tensor, cond: TextEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t, h = self._text(cond, x), self.enc_in(x)
        for block, down in zip(self.enc_blocks, self.enc_downs):
            h = down(block(h, t))
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor, cond: TextEmbedding | None = None) -> torch.Tensor:
        t, h = self._text(cond, z), self.dec_in(z)
        if cond is not None:
            h = h + self.layout(cond.pooled.to(z.dtype))
        for block, up in zip(self.dec_blocks, self.dec_ups):
            h = up(F.interpolate(block(h, t), scale_factor=2, mode="nearest"))
        return self.dec_out(F.silu(h))

    def forward(self, z: torch.Tensor, cond: TextEmbedding | None = None, truncation: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        # truncation lowers the prior's temperature (Kingma & Dhariwal 2018)
        return self.decode(z * truncation, cond)


def vae(context_dim: int, channels: int = 3, image_size: int = 32, latent_channels: int = 4, width: int = 64,
        downs: int = 2, text_dim: int = 64):
    """Conditional VAE with a spatial latent (Kingma & Welling 2014; Sohn et al. 2015)."""
    return ConditionalVAE(context_dim, channels, image_size, latent_channels, width, downs, text_dim)
