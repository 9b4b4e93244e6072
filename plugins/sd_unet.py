"""Stable Diffusion's UNet, limner's own: the text-conditioned latent UNet of latent diffusion
(Rombach et al. 2022) in the configurations SD 1.x (conv projections, 768-wide context, 8 heads)
and SD 2.x (linear projections, 1024-wide context, 64-wide heads, epsilon or v prediction) use.

Architecture and parameter names follow diffusers' UNet2DConditionModel (conv_in, time_embedding,
down_blocks.i.{resnets,attentions,downsamplers}, mid_block, up_blocks, conv_norm_out, conv_out), so
a diffusers `unet/` folder loads as it is; a single file in the original layout is mapped onto
these names by its family's key map. The pieces: ResNet blocks with the timestep embedding added
between their two convolutions; spatial transformers (GroupNorm, a projection in, blocks of
self-attention, cross-attention to the text tokens and a GEGLU feed-forward (Shazeer 2020), a
projection out, a residual); stride-2 convolutions down, nearest-neighbour doubling and a
convolution up; skip connections concatenated on the way up.

The model was trained on discrete DDPM timesteps: `sd_unet` wraps it so that limner's samplers,
which speak sigmas, drive it (EDM preconditioning with sigma_data = 1, the timestep read off the
model's sigma table by log-sigma interpolation, as k-diffusion's DiscreteEpsDDPMDenoiser does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.attention import attention
from limner.diffusion import Preconditioned
from limner.nn import geglu_of
from limner.noise import SigmaTable, ddpm_sigmas
from limner.protocols import TextEmbedding

PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, cosines first (DDPM's, as SD uses it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=eps), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x) + h


class Attention(nn.Module):
    """Multi-head attention over `context` (itself when None); q, k, v without bias."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = (p(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2) for p in (self.to_k, self.to_v))
        return self.to_out[0](attention(q, k, v, mask).transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu_of(self.proj, x)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm, a 1x1 conv (SD 1) or linear (SD 2) in, the
    blocks over the H*W tokens, the same out, a residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, linear: bool, groups: int):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, mask)
        if self.linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + (t if self.linear else self.proj_out(t))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, temb: int, heads: int | None, context_dim: int, depth: int,
                 linear: bool, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, temb, groups) for i in range(blocks))
        if heads:
            self.attentions = nn.ModuleList(SpatialTransformer(cout, heads, context_dim, depth, linear, groups)
                                            for _ in range(blocks))
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout)])

    def forward(self, x, temb, context, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, mask)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, cprev: int, cout: int, skip_channels: list[int], temb: int, heads: int | None,
                 context_dim: int, depth: int, linear: bool, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock((cprev if i == 0 else cout) + s, cout, temb, groups)
                                     for i, s in enumerate(skip_channels))
        if heads:
            self.attentions = nn.ModuleList(SpatialTransformer(cout, heads, context_dim, depth, linear, groups)
                                            for _ in skip_channels)
        if up:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x, skips: list[torch.Tensor], temb, context, mask, size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, mask)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, temb: int, heads: int, context_dim: int, depth: int, linear: bool, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, context_dim, depth, linear, groups)])

    def forward(self, x, temb, context, mask) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), context, mask), temb)


# the original (CompVis/Stability, ComfyUI, A1111, kohya) names of a diffusers ResNet block's layers
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_name(key: str, blocks: int, attention: list[bool]) -> str:
    """The original name of a diffusers UNet parameter (levels of `blocks` resnets each)."""
    parts = key.split(".")
    levels = len(attention)

    def resnet(rest: list[str]) -> str:
        return ".".join([RESNET.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "conv_in":
        return f"input_blocks.0.0.{parts[1]}"
    if parts[0] == "time_embedding":
        return f"time_embed.{'0' if parts[1] == 'linear_1' else '2'}.{parts[2]}"
    if parts[0] in ("conv_norm_out", "conv_out"):
        return f"out.{'0' if parts[0] == 'conv_norm_out' else '2'}.{parts[1]}"
    if parts[0] == "add_embedding":  # SDXL's pooled-text-and-size embedding
        return f"label_emb.0.{'0' if parts[1] == 'linear_1' else '2'}.{parts[2]}"
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return "middle_block.1." + ".".join(parts[3:])
        return f"middle_block.{0 if parts[2] == '0' else 2}." + resnet(parts[3:])
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        k = 1 + i * (blocks + 1)
        if kind == "downsamplers":
            return f"input_blocks.{k + blocks}.0.op." + ".".join(rest[1:])
        return f"input_blocks.{k + j}.{0 if kind == 'resnets' else 1}." + (resnet(rest) if kind == "resnets"
                                                                           else ".".join(rest))
    k = i * (blocks + 1)  # up_blocks
    if kind == "upsamplers":
        return f"output_blocks.{k + blocks}.{2 if attention[levels - 1 - i] else 1}.conv." + ".".join(rest[1:])
    return f"output_blocks.{k + j}.{0 if kind == 'resnets' else 1}." + (resnet(rest) if kind == "resnets"
                                                                       else ".".join(rest))


class UNet2DCondition(nn.Module):
    """forward(x, t, context [B, L, context_dim], added) -> the model's prediction (noise or v).
    `depth`: transformer blocks per level (the middle takes the last level's); SDXL's UNet also
    embeds `added` = (pooled text [B, P], size and crop numbers [B, K]): each number's
    `add_time_dim`-wide sinusoid, after the pooled text, through `add_embedding` into the time
    embedding (Podell et al. 2023)."""

    lora_part = "unet"  # LoRA files address its layers by these (diffusers') names

    def __init__(self, in_channels: int, out_channels: int, channels: list[int], blocks: int, attention: list[bool],
                 heads: list[int], context_dim: int, depth: list[int], linear: bool, groups: int,
                 add_in: int = 0, add_time_dim: int = 0):
        super().__init__()
        temb = 4 * channels[0]
        self.blocks, self.attention = blocks, list(attention)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.add_time_dim = add_time_dim
        if add_in:
            self.add_embedding = TimestepEmbedding(add_in, temb)
        levels = len(channels)
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], c, blocks, temb, heads[i] if attention[i] else None, context_dim,
                      depth[i], linear, groups, down=i < levels - 1) for i, c in enumerate(channels))
        self.mid_block = MidBlock(channels[-1], temb, heads[-1], context_dim, depth[-1], linear, groups)
        # the skips each up block takes, last pushed first: its own level's outputs, then the level below's
        skips = [channels[0]] + [c for i, c in enumerate(channels) for _ in range(blocks + (i < levels - 1))]
        ups, prev = [], channels[-1]
        for j, i in enumerate(reversed(range(levels))):
            taken = [skips.pop() for _ in range(blocks + 1)]
            ups.append(UpBlock(prev, channels[i], taken, temb, heads[i] if attention[i] else None, context_dim,
                               depth[i], linear, groups, up=j < levels - 1))
            prev = channels[i]
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=1e-5)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def original_name(self, key: str) -> str:
        """A parameter's (or layer's) name in the original layout (input_blocks / middle_block /
        output_blocks, as single files, ComfyUI and kohya's SDXL LoRAs spell it)."""
        return unet_name(key, self.blocks, self.attention)

    def lora_aliases(self) -> dict[str, str]:
        """The original-layout name of each linear and convolution layer -> its own name: LoRA
        files for SDXL address the UNet this way."""
        return {self.original_name(n + ".weight").removesuffix(".weight"): n for n, m in self.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))}

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                added: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        temb = self.time_embedding(timestep_embedding(t.expand(x.shape[0]), self.conv_in.out_channels).to(x.dtype))
        if hasattr(self, "add_embedding"):
            pooled, numbers = added
            feats = timestep_embedding(numbers.flatten(), self.add_time_dim).reshape(len(numbers), -1)
            temb = temb + self.add_embedding(torch.cat([pooled, feats.to(pooled.dtype)], dim=-1).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, temb, context, mask)
            skips += out
        h = self.mid_block(h, temb, context, mask)
        for block in self.up_blocks:
            n = len(block.resnets)
            taken, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips and hasattr(block, "upsamplers") else None  # odd sizes come back
            h = block(h, taken, temb, context, mask, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class DiscreteTimeNet(nn.Module):
    """The UNet seen as net(x_in, c_noise, cond): the fractional DDPM timestep of sigma =
    exp(4 c_noise) read off the model's sigma table (k-diffusion's sigma_to_t)."""

    def __init__(self, unet: UNet2DCondition, table: SigmaTable, original_size: list[int] | None = None,
                 crop: list[int] = (0, 0), pixel_factor: int = 8):
        super().__init__()
        self.unet, self.table = unet, table
        self.original_size, self.crop, self.pixel_factor = original_size, list(crop), pixel_factor

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        if cond is None:
            raise limner.LimnerError("a Stable Diffusion UNet needs the text tokens: encode a prompt (\"\" for none)")
        t = self.table.timestep((4 * c_noise.double()).exp()).to(device=x_in.device, dtype=torch.float32)
        added = None
        if hasattr(self.unet, "add_embedding"):  # SDXL: the image's size and crop, as diffusers' add_time_ids
            target = [d * self.pixel_factor for d in x_in.shape[-2:]]
            numbers = [*(self.original_size or target), *self.crop, *target]
            added = (cond.pooled.to(x_in.dtype), torch.tensor(numbers, dtype=torch.float32,
                                                               device=x_in.device).expand(len(x_in), -1))
        return self.unet(x_in, t, cond.tokens.to(x_in.dtype), added=added)


def _levels(name: str, value, levels: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise limner.LimnerError(f"sd_unet: {name} must give one value per level ({levels}), got {values}")
    return values


def sd_unet(context_dim: int, in_channels: int = 4, image_size: int = 64, out_channels: int | None = None,
            channels: list[int] = (320, 640, 1280, 1280), blocks: int = 2,
            attention: list[bool] = (True, True, True, False), heads: list[int] | int = 8, head_dim: int = 0,
            depth: list[int] | int = 1, linear_projection: bool = False, groups: int = 32, prediction: str = "eps",
            betas: str = "scaled_linear", concat: int = 0, pooled_dim: int = 0, add_time_dim: int = 256,
            original_size: list[int] | None = None, crop: list[int] = (0, 0), pixel_factor: int = 8) -> Preconditioned:
    """Stable Diffusion's UNet (SD 1.x by default; SD 2.x: head_dim = 64, linear_projection =
    true, context 1024, prediction "v" for the 768-v models), driven by sigmas: `prediction`
    eps or v, `betas` the DDPM schedule it was trained with; `concat` image channels read
    beside the latent (5 for the inpainting models: the mask and the masked image's latents).
    SDXL's: channels 320/640/1280, attention false/true/true, depth 0/2/10, head_dim 64, context
    2048, `pooled_dim` 1280 (the pooled text it embeds with the size and crop numbers, each an
    `add_time_dim`-wide sinusoid; `original_size` [h, w] defaults to the image's, `crop` to 0, 0;
    `pixel_factor` is the autoencoder's, from latent to image size)."""
    levels = len(channels)
    for name, value in (("blocks", blocks), ("groups", groups), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise limner.LimnerError(f"sd_unet: {name} must be a whole number >= 1, got {value!r}")
    depth = _levels("depth", depth, levels)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depth):
        raise limner.LimnerError(f"sd_unet: depth must be whole numbers >= 0 (transformer blocks per level), got "
                                 f"{depth}")
    for name, value in (("pooled_dim", pooled_dim), ("add_time_dim", add_time_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 2:
            raise limner.LimnerError(f"sd_unet: {name} must be an even whole number >= 0, got {value!r}")
    if not (isinstance(crop, (list, tuple)) and len(crop) == 2 and all(isinstance(c, int) and c >= 0 for c in crop)
            and (original_size is None or (isinstance(original_size, (list, tuple)) and len(original_size) == 2 and
                                           all(isinstance(c, int) and c > 0 for c in original_size)))):
        raise limner.LimnerError(f"sd_unet: original_size ([h, w] > 0) and crop ([top, left] >= 0) are two whole "
                                 f"numbers each, got {original_size!r} and {crop!r}")
    if isinstance(concat, bool) or not isinstance(concat, int) or concat < 0:
        raise limner.LimnerError(f"sd_unet: concat must be a whole number >= 0, got {concat!r}")
    if levels < 1 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % groups for c in channels):
        raise limner.LimnerError(f"sd_unet: channels must list whole numbers, each a multiple of groups ({groups}), "
                                 f"got {list(channels)}")
    attention = [bool(a) for a in _levels("attention", attention, levels)]
    heads = [c // head_dim for c in channels] if head_dim else _levels("heads", heads, levels)
    bad = [(c, h) for c, h, a in zip(channels, heads, attention + [True]) if h < 1 or c % h]
    if bad or (head_dim and any(c % head_dim for c in channels)):
        raise limner.LimnerError(f"sd_unet: each level's channels must split into its heads evenly, got channels "
                                 f"{list(channels)} and heads {heads}")
    if prediction not in PREDICTIONS:
        raise limner.LimnerError(f"sd_unet: prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if image_size % 2 ** (levels - 1):
        raise limner.LimnerError(f"sd_unet: the latent size {image_size} must be a multiple of {2 ** (levels - 1)}")
    unet = UNet2DCondition(in_channels + concat, out_channels or in_channels, list(channels), blocks, attention,
                           heads, context_dim, depth, linear_projection, groups,
                           add_in=pooled_dim + 6 * add_time_dim if pooled_dim else 0, add_time_dim=add_time_dim)
    net = DiscreteTimeNet(unet, SigmaTable(ddpm_sigmas(betas)), original_size, crop, pixel_factor)
    return Preconditioned(net, PREDICTIONS[prediction], 1.0, concat=concat)
