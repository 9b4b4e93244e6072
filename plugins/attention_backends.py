"""Attention backends, each declaring what it takes and its rank in the CPU's fixed `auto` rule
(limner.attention.Declared): `sdpa` (torch; takes everything, the CPU's fallback), `cpu` (our
fused C++ kernel for head dim 16 on AVX-512 CPUs: ranked first where it fits and is built),
`cpu_bf16` (our bf16 kernel for long sequences on CPUs with AMX: likewise), `cpu_f32` (our float32
kernel for SD's 4,096-pixel self-attention and its cross-attention to text: likewise),
`math` (plain PyTorch: the reference), `triton` (our FlashAttention forward) and `xformers`
(when installed). On CUDA `auto` measures them all."""
from __future__ import annotations

from einops import rearrange

import limner
from limner.attention import Declared
from limner.kernels import (
    attention_cpu,
    attention_cpu_bf16,
    attention_cpu_f32,
    attention_math,
    attention_sdpa,
    attention_triton,
    cpu_attention,
    cpu_flash_bf16,
    cpu_flash_f32,
)


def sdpa():
    """torch.nn.functional.scaled_dot_product_attention."""
    return Declared(attention_sdpa, rank=0)


def math():
    """Plain PyTorch attention in float32: the reference."""
    return Declared(attention_math)


def triton():
    """Our FlashAttention forward in Triton (Dao et al. 2022); CUDA, or CPU under TRITON_INTERPRET=1."""
    return Declared(attention_triton)


def _cpu_fits(q, k, v, mask) -> bool:
    return cpu_attention.fits(q, k, v, mask) and cpu_attention.KERNEL.available()


def cpu():
    """limner's fused attention for the CPU at head dim 16 (AVX-512, forward and backward; built at first use)."""
    return Declared(attention_cpu, fits=_cpu_fits, rank=10)


def _cpu_bf16_fits(q, k, v, mask) -> bool:
    return cpu_flash_bf16.fits(q, k, v, mask) and cpu_flash_bf16.faster(q, k) and cpu_flash_bf16.runs()


def cpu_bf16():
    """limner's bf16 attention for the CPU (oneDNN batch-reduce GEMMs, AMX where present; forward
    only; built at first use): ranked first where it fits and measured faster than torch's."""
    return Declared(attention_cpu_bf16, fits=_cpu_bf16_fits, rank=10)


def _cpu_f32_fits(q, k, v, mask) -> bool:
    return (cpu_flash_f32.fits(q, k, v, mask) and cpu_flash_f32.faster(q, k)
            and cpu_flash_f32.KERNEL.available())


def cpu_f32():
    """limner's float32 attention for the CPU (transposed online softmax over oneDNN batch-reduce
    GEMMs; forward only; built at first use): ranked first where it fits and measured faster than torch's."""
    return Declared(attention_cpu_f32, fits=_cpu_f32_fits, rank=10)


def xformers():
    """xformers' memory_efficient_attention (Lefaudeux et al. 2022), CUDA only."""
    try:
        import xformers.ops as xops
    except ImportError:
        raise limner.LimnerError(
            "the xformers attention backend needs xformers: pip install limner[xformers]"
        ) from None

    def attend(q, k, v, mask=None):
        bias = None
        if mask is not None:  # xformers takes an additive bias; its last dim must be padded to 8
            bias = q.new_zeros(mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).shape)
            bias = bias.masked_fill(~mask, float("-inf"))
        out = xops.memory_efficient_attention(*(rearrange(t, "b h l d -> b l h d") for t in (q, k, v)), attn_bias=bias)
        return rearrange(out, "b l h d -> b h l d")

    return Declared(attend, fits=lambda q, k, v, mask: q.is_cuda)
