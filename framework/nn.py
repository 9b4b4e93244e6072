"""Building blocks shared by denoisers: noise-level embedding, attention, feed-forward."""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from limner.kernels import Packed, conv2d, geglu, linear, linear_geglu

from .attention import attention


def noise_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of the noise level [B] -> [B, dim] (Vaswani et al. 2017; ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * 1000 * freqs[None]  # c_noise = log(sigma)/4 spans about +-1
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def hookless(module: nn.Module) -> bool:
    """True when nothing hooks `module`'s forward (an unmerged LoRA does): a fused op may then
    use its weights without calling it."""
    from torch.nn.modules import module as hooks

    return not (module._forward_hooks or module._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


def geglu_of(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GEGLU of proj(x): proj's matmul and the gate fused where they fit (limner.kernels.linear_geglu)."""
    return linear_geglu(x, proj.weight, proj.bias) if hookless(proj) else geglu(proj(x))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is limner.kernels.linear: on the
    CPU, many tokens go through oneDNN rather than the BLAS sgemm (~2x there, onednn_linear.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class KernelConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict) that runs on limner's kernels on the CPU
    (limner.kernels.conv2d): 3x3 ones by Winograd's minimal filtering where it measured faster
    (float32, in training too: its forward and input gradient; bf16 inference with its transformed
    weight kept), other bf16 ones on a weight packed for oneDNN once instead of at every call
    (conv2d_packed; same outputs). What limner.pipeline.kernel_convs turns a pipeline's and a
    diffusion training run's convolutions into (`from_conv`); elsewhere nn.Conv2d's. Under torch.compile
    the Winograd kernel is one op of the graph, its weight transformed in the graph (no kept copy)."""

    packed: Packed

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> KernelConv2d:
        """`conv` itself, now of this class (its parameters, hooks and place in the model kept)."""
        conv.__class__, conv.packed = cls, Packed()
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        weight, bias, packed = self.weight, self.bias, self.packed
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
                torch.get_autocast_dtype("cpu") is torch.bfloat16:  # what autocast does at F.conv2d's door, done
            x = x.to(torch.bfloat16)                                # here so that limner's bf16 kernels see it
            if weight.dtype is torch.float32 and not torch.is_grad_enabled():  # cast at every call: nothing to keep
                weight, packed = weight.to(torch.bfloat16), None
                bias = None if bias is None else bias.to(torch.bfloat16)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups, packed=packed)


class Attention(nn.Module):
    """Multi-head self-attention, or cross-attention to a context with a key mask."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_kv = Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, L, D]; context: [B, M, Dc]; mask: [B, M], True = attend
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads) for t in (self.to_q(x), k, v))
        key_mask = None if mask is None else rearrange(mask.bool(), "b m -> b 1 1 m")
        return self.out(rearrange(attention(q, k, v, key_mask), "b h l d -> b l (h d)"))


class FeedForward(nn.Module):
    """Linear -> GEGLU -> Linear (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in, self.proj_out = Linear(dim, 2 * mult * dim), Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(geglu_of(self.proj_in, x))


def conv_stages(in_channels: int, channels: int) -> list[nn.Module]:
    """Three stages of two 3x3 conv-GroupNorm-SiLU layers, channels c, 2c, 4c, the last two
    entered with stride 2 (a 32x32 image -> an 8x8 grid): the image encoder of the captioner
    and the image-text matcher."""

    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

    c = channels
    return [stage(in_channels, c, 1), stage(c, 2 * c, 2), stage(2 * c, 4 * c, 2)]


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ContextRefiner(nn.Module):
    """A few trainable pre-norm transformer layers over the text tokens, run once per forward,
    before any cross-attention reads them (the "token refiner" of HunyuanVideo, Kong et al.
    2024). With a frozen text encoder they let the denoiser re-mix its tokens - e.g. carry "at
    the top left" into the tokens of the object it belongs to - while the frozen encoder's
    embeddings stay cacheable. The output layers start at zero: at initialisation the refiner
    is the identity."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)]) for _ in range(layers))
        self.attns = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.ffs = nn.ModuleList(FeedForward(dim, mult=2) for _ in range(layers))
        for attn, ff in zip(self.attns, self.ffs):
            zero_init(attn.out), zero_init(ff.proj_out)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # tokens: [B, L, D]; mask: [B, L], True = a real token (padding is never attended to)
        for (n1, n2), attn, ff in zip(self.norms, self.attns, self.ffs):
            tokens = tokens + attn(n1(tokens), mask=mask)
            tokens = tokens + ff(n2(tokens))
        return tokens
