"""AutoencoderKL, limner's own: the KL-regularised convolutional autoencoder of latent diffusion
(Rombach et al. 2022), the "VAE" of Stable Diffusion 1.x, 2.x and SDXL. An image in [-1, 1]
becomes a latent 8x smaller per side (`factor` = 2^(levels - 1)) with `latent_channels`
channels; the denoiser works on latents scaled by `scale` (and shifted by `shift`, zero here),
so that they have about unit variance: 0.18215 for SD 1.x/2.x, 0.13025 for SDXL.

Architecture and parameter names follow diffusers' AutoencoderKL (encoder.down_blocks.i.resnets.j,
...mid_block.attentions.0.to_q, decoder.up_blocks..., quant_conv, post_quant_conv), so a diffusers
`vae/` folder loads as it is; a Stable Diffusion single file is mapped onto these names by its
family's key map. GroupNorm with eps 1e-6 and SiLU throughout; one single-head attention in the
middle of each half; downsampling by a stride-2 convolution after padding right and bottom by one,
upsampling by nearest-neighbour doubling and a 3x3 convolution.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.attention import attention
from limner.checkpoint import load_module


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x) + h


class MidAttention(nn.Module):
    """One head over all positions, with its own GroupNorm and a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (p(t)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # one head
        out = self.to_out[0](attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Resnets, then a down- or upsampler (none at the last level)."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for resample in getattr(self, "downsamplers", getattr(self, "upsamplers", ())):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cin: int, widths: list[int], blocks: int, groups: int, latent: int):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        prev = [widths[0], *widths[:-1]]
        self.down_blocks = nn.ModuleList(
            Level(p, w, blocks, groups, "down" if i < len(widths) - 1 else None) for i, (p, w) in
            enumerate(zip(prev, widths)))
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out, self.conv_out = _norm(widths[-1], groups), nn.Conv2d(widths[-1], 2 * latent, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cout: int, widths: list[int], blocks: int, groups: int, latent: int):
        super().__init__()
        rev = widths[::-1]
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        prev = [rev[0], *rev[:-1]]
        self.up_blocks = nn.ModuleList(Level(p, w, blocks + 1, groups, "up" if i < len(rev) - 1 else None)
                                       for i, (p, w) in enumerate(zip(prev, rev)))
        self.conv_norm_out, self.conv_out = _norm(widths[0], groups), nn.Conv2d(widths[0], cout, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode(images [-1, 1]) -> scaled latents (the mean, or a sample with `generator`);
    decode(scaled latents) -> images. `moments(images)` -> (mean, log-variance), unscaled."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (128, 256, 512, 512), blocks: int = 2,
                 latent_channels: int = 4, groups: int = 32, scale: float = 0.18215, shift: float = 0.0):
        super().__init__()
        self.encoder = Encoder(in_channels, list(widths), blocks, groups, latent_channels)
        self.decoder = Decoder(in_channels, list(widths), blocks, groups, latent_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.factor, self.scale, self.shift = 2 ** (len(widths) - 1), scale, shift
        self.options = {"in_channels": in_channels, "widths": list(widths), "blocks": blocks,
                        "latent_channels": latent_channels, "groups": groups, "scale": scale, "shift": shift}

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance (clamped to [-30, 20], as the original)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.moments(images)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return (mean - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents / self.scale + self.shift))

    def latent_shape(self, channels: int, size: int) -> tuple[int, int, int]:
        """[C, H, W] of the latent of a `size`-pixel square image."""
        if channels != self.in_channels:
            raise limner.LimnerError(f"this autoencoder takes {self.in_channels}-channel images, not {channels}")
        if size % self.factor:
            raise limner.LimnerError(f"image size {size} must be a multiple of the autoencoder's factor {self.factor}")
        return self.latent_channels, size // self.factor, size // self.factor


def autoencoder_kl(in_channels: int | None = None, widths: list[int] | None = None, blocks: int | None = None,
                   latent_channels: int | None = None, groups: int | None = None, scale: float | None = None,
                   shift: float | None = None, freeze: bool = True, path: str | None = None) -> AutoencoderKL:
    """Latent diffusion's KL autoencoder, any size (options left out are Stable Diffusion's: 3 colour
    channels, widths 128/256/512/512, 2 blocks, 4 latent channels, 32 groups, scale 0.18215, shift
    0: 83.7M parameters, 8x smaller latents; SDXL's scale is 0.13025), or the one an `autoencoder`
    run trained (`path` = RUN/autoencoder: its shape, latent statistics and weights)."""
    options = {k: v for k, v in (("in_channels", in_channels), ("widths", widths), ("blocks", blocks),
                                 ("latent_channels", latent_channels), ("groups", groups), ("scale", scale),
                                 ("shift", shift)) if v is not None}
    if path is None:
        return _sized(**options).eval().requires_grad_(not freeze)
    folder = Path(path)
    if options:
        raise limner.LimnerError(f"autoencoder_kl: {folder} gives the autoencoder's shape and statistics; drop "
                                 f"{', '.join(sorted(options))} (or drop path for an untrained one)")
    try:
        meta = json.loads((folder / "autoencoder.json").read_text())
    except (OSError, ValueError) as exc:
        raise limner.LimnerError(f"autoencoder_kl: no trained autoencoder at {folder} ({exc}); train one with "
                                 "`limner train` of an autoencoder config (recipe = \"autoencoder\")") from None
    if not isinstance(meta, dict) or meta.get("autoencoder") not in ("autoencoder_kl", "sd_vae") or \
            not isinstance(meta.get("options"), dict) or "path" in meta["options"]:
        raise limner.LimnerError(f"autoencoder_kl: {folder / 'autoencoder.json'} is not an autoencoder_kl's "
                                 "(it names another autoencoder or has no options table)")
    try:
        model = _sized(**meta["options"])
    except TypeError as exc:
        raise limner.LimnerError(f"autoencoder_kl: {folder / 'autoencoder.json'} has options it does not take "
                                 f"({exc})") from None
    load_module(model, folder / "model.safetensors")
    return model.eval().requires_grad_(not freeze)


def _sized(in_channels: int = 3, widths: list[int] = (128, 256, 512, 512), blocks: int = 2,
           latent_channels: int = 4, groups: int = 32, scale: float = 0.18215, shift: float = 0.0) -> AutoencoderKL:
    widths = list(widths)
    for name, value, low in (("in_channels", in_channels, 1), ("blocks", blocks, 1),
                             ("latent_channels", latent_channels, 1), ("groups", groups, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise limner.LimnerError(f"autoencoder_kl: {name} must be a whole number >= {low}, got {value!r}")
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % groups for w in widths):
        raise limner.LimnerError(f"autoencoder_kl: widths must list whole numbers, each a multiple of groups "
                                 f"({groups}), got {widths}")
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(shift)):
        raise limner.LimnerError(f"autoencoder_kl: scale must be a finite number > 0 and shift finite, got scale "
                                 f"{scale!r}, shift {shift!r}")
    return AutoencoderKL(in_channels, tuple(widths), blocks, latent_channels, groups, float(scale), float(shift))
