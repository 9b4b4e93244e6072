"""A third model family in one module: diffusers' unconditional DDPM folders (DDPMPipeline or
DDIMPipeline, e.g. google/ddpm-cifar10-32, Ho et al. 2020), read by path like limner's own
Stable Diffusion family: `limner inspect FOLDER`, `limner.load_pipeline(FOLDER)([""])` (the
model reads no prompt; `limner sample` asks for one, so it is for prompted models).

The three parts a family needs, all here:
- its networks: `DDPMUNet`, diffusers' UNet2DModel (ResNet blocks with a time embedding,
  self-attention where the block type says so, stride-2 convolutions down, nearest-neighbour
  doubling up), written with diffusers' parameter names, and `Unconditional`, a text encoder for
  a model that reads no prompt (an empty one is its only input);
- its key map: the folder's unet/ tensors become the denoiser's `denoiser.net.unet.*` (diffusers'
  own names, so the map is a prefix; a file of another layout would rename here);
- its detector: model_index.json naming the pipeline, the UNet's and scheduler's configs.

The network is driven by sigmas as every limner denoiser: eps prediction on the scheduler's DDPM
sigma table (limner.noise), wrapped in limner.diffusion.Preconditioned.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.diffusion import Preconditioned
from limner.noise import SigmaTable, ddpm_sigmas
from limner.protocols import Found, TextEmbedding

PIPELINES = ("DDPMPipeline", "DDIMPipeline")
BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
BOUNDS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # the betas limner.noise makes


# --- the networks ----------------------------------------------------------------------------

def timestep_features(t: torch.Tensor, dim: int, flip: bool, shift: float) -> torch.Tensor:
    """Sinusoidal features of the timesteps (Vaswani et al. 2017, as DDPM embeds t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    angles = t.float()[:, None] * freqs[None]
    sin, cos = angles.sin(), angles.cos()
    return torch.cat([cos, sin] if flip else [sin, cos], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(channels, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Self-attention over the pixels with a residual, GroupNorm first; heads of head_dim (0:
    one head as wide as the channels)."""

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float):
        super().__init__()
        self.heads = channels // head_dim if head_dim else 1
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = (f(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class Sampler(nn.Module):
    """A stride-2 convolution down (padded by `pad` all round, or 0: right and bottom by one) or a
    nearest-neighbour doubling and a convolution up."""

    def __init__(self, channels: int, up: bool, pad: int = 1):
        super().__init__()
        self.up, self.pad = up, pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad == 0 else x)


class Block(nn.Module):
    """One level of either half: resnets (each followed by attention in an Attn* block) and the
    level's down- or upsampler."""

    def __init__(self, ins: list[int], cout: int, attention: bool, sampler: str | None, temb: int, groups: int,
                 eps: float, head_dim: int, pad: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c, cout, temb, groups, eps) for c in ins)
        self.attentions = nn.ModuleList(Attention(cout, head_dim, groups, eps) for _ in ins) if attention else None
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Sampler(cout, up=False, pad=pad)])
        elif sampler == "up":
            self.upsamplers = nn.ModuleList([Sampler(cout, up=True)])

    def layers(self):
        for i, resnet in enumerate(self.resnets):
            yield resnet, None if self.attentions is None else self.attentions[i]


class MidBlock(nn.Module):
    def __init__(self, channels: int, temb: int, groups: int, eps: float, head_dim: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, temb, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, head_dim, groups, eps)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, emb)), emb)


class DDPMUNet(nn.Module):
    """diffusers' UNet2DModel: unet(x, t) -> eps, for float timesteps t."""

    def __init__(self, channels: int, out_channels: int, widths: list[int], blocks: int, attention: list[bool],
                 groups: int, eps: float, head_dim: int, flip: bool, shift: float, pad: int):
        super().__init__()
        temb, self.flip, self.shift, self.width0 = 4 * widths[0], flip, shift, widths[0]
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(widths[0], temb)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            Block([widths[max(i - 1, 0)]] + [w] * (blocks - 1), w, attention[i], "down" if i < last else None, temb,
                  groups, eps, head_dim, pad) for i, w in enumerate(widths))
        self.mid_block = MidBlock(widths[-1], temb, groups, eps, head_dim)
        rev, up_attention = widths[::-1], attention[::-1]
        ups = []
        for i, w in enumerate(rev):
            prev, skip_in = rev[max(i - 1, 0)], rev[min(i + 1, last)]
            ins = [(prev if j == 0 else w) + (skip_in if j == blocks else w) for j in range(blocks + 1)]
            ups.append(Block(ins, w, up_attention[i], "up" if i < last else None, temb, groups, eps, head_dim))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(timestep_features(t.expand(x.shape[0]), self.width0, self.flip, self.shift))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for resnet, attn in block.layers():
                x = resnet(x, emb)
                skips.append(x if attn is None else (x := attn(x)))
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(x, emb)
        for block in self.up_blocks:
            for resnet, attn in block.layers():
                x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
                x = x if attn is None else attn(x)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class OnTimesteps(nn.Module):
    """net(x_in, c_noise, cond) for Preconditioned: the (fractional) DDPM timestep of sigma =
    exp(4 c_noise) on the model's sigma table; the (empty) prompt is not read."""

    def __init__(self, unet: DDPMUNet, table: SigmaTable):
        super().__init__()
        self.unet, self.table = unet, table

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        t = self.table.timestep((4 * c_noise.double()).exp()).to(device=x_in.device, dtype=torch.float32)
        return self.unet(x_in, t)


def ddpm_unet(context_dim: int, in_channels: int = 3, image_size: int = 32, out_channels: int | None = None,
              widths: list[int] = (128, 256, 256, 256), blocks: int = 2,
              attention: list[bool] = (False, True, False, False), groups: int = 32, eps: float = 1e-6,
              head_dim: int = 0, flip_sin_to_cos: bool = False, freq_shift: float = 1.0, downsample_padding: int = 0,
              betas: str = "linear", timesteps: int = 1000) -> Preconditioned:
    """An unconditional DDPM UNet (diffusers' UNet2DModel; google/ddpm-cifar10-32's shape by
    default), predicting eps on the DDPM sigma table of `betas`; head_dim 0 = one head."""
    widths, attention = list(widths), [bool(a) for a in attention]
    if not widths or len(attention) != len(widths) or any(w % groups for w in widths):
        raise limner.LimnerError(f"ddpm_unet: widths (multiples of groups = {groups}) and attention need one entry "
                                 f"per level, got widths {widths}, attention {attention}")
    if betas not in BETAS.values():
        raise limner.LimnerError(f"ddpm_unet: betas must be one of {', '.join(BETAS.values())}, got {betas!r}")
    unet = DDPMUNet(in_channels, out_channels or in_channels, widths, blocks, attention, groups, eps, head_dim,
                    flip_sin_to_cos, freq_shift, downsample_padding)
    return Preconditioned(OnTimesteps(unet, SigmaTable(ddpm_sigmas(betas, timesteps))), "eps", 1.0)


class Unconditional(nn.Module):
    """The text encoder of a model that reads no prompt: one empty token per prompt. Any prompt
    but "" is refused, so a prompt is never silently ignored."""

    dim = 1

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        said = [p for p in prompts if p.strip()]
        if said:
            raise limner.LimnerError(f"this model is unconditional: it reads no prompt, so {said[0]!r:.60} would be "
                                     "ignored; give an empty one (-p \"\")")
        n = len(prompts)
        return TextEmbedding(torch.zeros(n, 1, 1), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n, 1))


def unconditional() -> Unconditional:
    """No text: for unconditional models."""
    return Unconditional()


# --- the detector and the key map --------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise limner.LimnerError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise limner.LimnerError(f"{path} is not a JSON object")
    return data


class DDPMFolders:
    """detect(path) -> Found | None; load(path) -> (run config, state dict)."""

    def detect(self, path: Path) -> Found | None:
        index = Path(path) / "model_index.json"
        if not index.is_file() or _json(index).get("_class_name") not in PIPELINES:
            return None
        unet, scheduler = self.configs(Path(path))
        weights = Path(path) / "unet" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise limner.LimnerError(f"{path}: no unet/diffusion_pytorch_model.safetensors (a pickled .bin is never "
                                     "read: unpickling runs code)")
        return Found("ddpm", "diffusers folder", {"pipeline": _json(index)["_class_name"], "prediction": "epsilon",
                                                  "image_size": unet.get("sample_size"),
                                                  "betas": scheduler.get("beta_schedule", "linear")})

    @staticmethod
    def configs(path: Path) -> tuple[dict, dict]:
        unet = _json(path / "unet" / "config.json")
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
        kinds = set(unet.get("down_block_types", [])) | set(unet.get("up_block_types", []))
        if unet.get("_class_name") != "UNet2DModel" or not kinds <= {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D",
                                                                      "AttnUpBlock2D"}:
            raise limner.LimnerError(f"{path}: a {unet.get('_class_name')} with blocks {sorted(kinds)} is not a UNet "
                                     "this family builds (UNet2DModel of (Attn)DownBlock2D/(Attn)UpBlock2D)")
        if scheduler.get("prediction_type", "epsilon") != "epsilon" or \
                scheduler.get("beta_schedule", "linear") not in BETAS:
            raise limner.LimnerError(f"{path}: a {scheduler.get('prediction_type')} model on "
                                     f"{scheduler.get('beta_schedule')} betas is not one this family runs (epsilon; "
                                     f"{', '.join(BETAS)})")
        kind = scheduler.get("beta_schedule", "linear")
        if kind in BOUNDS and (scheduler.get("beta_start", BOUNDS[kind][0]), scheduler.get("beta_end", BOUNDS[kind][1])
                               ) != BOUNDS[kind]:
            raise limner.LimnerError(f"{path}: {kind} betas from {scheduler.get('beta_start')} to "
                                     f"{scheduler.get('beta_end')} are not the usual {BOUNDS[kind]}, which this family "
                                     "runs")
        other = {k: unet[k] for k, usual in (("time_embedding_type", "positional"), ("center_input_sample", False),
                                              ("resnet_time_scale_shift", "default"), ("class_embed_type", None),
                                              ("add_attention", True), ("mid_block_scale_factor", 1),
                                              ("num_class_embeds", None)) if unet.get(k, usual) != usual}
        if other:
            raise limner.LimnerError(f"{path}: a UNet2DModel with {other} is not one this family builds")
        return unet, scheduler

    def load(self, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        path = Path(path)
        unet, scheduler = self.configs(path)
        down = unet["down_block_types"]
        denoiser = {"name": "ddpm_unet", "widths": list(unet["block_out_channels"]),
                    "blocks": int(unet.get("layers_per_block", 2)), "attention": [t.startswith("Attn") for t in down],
                    "groups": int(unet.get("norm_num_groups", 32)), "eps": float(unet.get("norm_eps", 1e-5)),
                    "head_dim": int(unet.get("attention_head_dim") or 0),
                    "downsample_padding": int(unet.get("downsample_padding", 1)),
                    "flip_sin_to_cos": bool(unet.get("flip_sin_to_cos", True)),
                    "freq_shift": float(unet.get("freq_shift", 0)), "out_channels": int(unet.get("out_channels", 3)),
                    "betas": BETAS[scheduler.get("beta_schedule", "linear")],
                    "timesteps": int(scheduler.get("num_train_timesteps", 1000))}
        sigmas = ddpm_sigmas(denoiser["betas"], denoiser["timesteps"])
        config = {"out": str(path), "recipe": "diffusion",
                  "model": {"text_encoder": {"name": "unconditional"}, "denoiser": denoiser,
                            "image_size": int(unet.get("sample_size", 32)),
                            "channels": int(unet.get("in_channels", 3))},
                  "sample": {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "karras"}, "steps": 25,
                             "guidance": 1.0, "sigma_min": float(sigmas[0]), "sigma_max": float(sigmas[-1])}}
        tensors = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
        return config, {f"denoiser.net.unet.{k}": v.float() for k, v in tensors.items()}  # the key map


def ddpm_folders() -> DDPMFolders:
    """diffusers' unconditional DDPM/DDIM pipeline folders."""
    return DDPMFolders()
