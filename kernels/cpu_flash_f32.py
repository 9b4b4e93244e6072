"""limner's float32 attention for the CPU, forward only: cpu_flash_f32.cpp (FlashAttention's online
softmax computed transposed, over oneDNN's batch-reduce GEMMs from torch's cpublas).

attention_cpu_f32(q, k, v) = softmax(q k^T / sqrt(D)) v for float32 CPU tensors [B, H, L, D]
without a mask and without a gradient to take, on an AVX-512 CPU. `fits` says which inputs it
takes; the attention dispatcher's `auto` ranks it first on the CPU at the shapes where it measured
faster than torch's flash kernel (`faster`, benchmarks/results/cpu-kernel-measurements.md) and
leaves the others to torch. Built at first use like the other C++ kernels (kernels/_cpp.py).
"""
from __future__ import annotations

import torch

from ._backend import AMX, unmasked_inference
from ._cpp import CppKernel

KERNEL = CppKernel("cpu_flash_f32.cpp", ["forward"], "float32 attention on the CPU uses torch's sdpa")
KEY_BLOCK = 128  # keys a block (128 and 256 measured alike; the query block is chosen by `query_block`)
KERNEL.define("forward", "(Tensor q, Tensor k, Tensor v, float scale, int qb, int kb) -> Tensor",
              lambda q, k, v, *_: q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]))


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """Whether attention_cpu_f32 takes these: float32 CPU q, k, v [B, H, L, D] of one head dim
    (1-512), last dims contiguous, at least one key, no mask, no gradient."""
    return (unmasked_inference(q, k, v, mask) and 0 < q.shape[-1] <= 512 and k.shape[2] > 0 and q.numel() > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v)))


def faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Where the kernel measured faster than torch's flash kernel (benchmarks/attention_f32.py,
    tables in benchmarks/results/cpu-kernel-measurements.md)."""
    d, queries, keys = q.shape[-1], q.shape[2], k.shape[2]
    if d < 24:  # head dim 16 has limner's other CPU kernel (cpu_attention.py)
        return False
    if not AMX:  # AMD EPYC (Zen 4): 1.04-1.85x from 256 queries up at head dims 40-512; at 64 queries 0.95x
        return queries >= 256
    # Intel Xeon: self-attention over SD 1.5's 4,096 latent pixels at head dim 40: 1.08x (at 64: a tie);
    # cross-attention of 1,024+ pixels to 77 text tokens: 1.2-1.9x up to head dim 80 (at 160 torch's is faster)
    return (keys >= 2048 and d <= 48) or (keys <= 128 and queries >= 1024 and d <= 80)


def query_block(q: torch.Tensor, k: torch.Tensor) -> int:
    """Queries a task: 256 against 2,048+ keys (151 ms against 157 at SD's 4,096), else 128."""
    return 256 if k.shape[2] >= 2048 else 128


def attention_cpu_f32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with limner's float32 CPU kernel ([B, H, Lq, D] out, a view of
    [B, Lq, H, D] memory so that "b h l d -> b l (h d)" costs nothing)."""
    if not fits(q, k, v, mask):
        raise ValueError(f"attention_cpu_f32 takes float32 CPU q, k, v [B, H, L, D] with D at most 512, at least one "
                         f"key, the last dim contiguous, no mask and no gradient; got q {tuple(q.shape)} {q.dtype}, k "
                         f"{tuple(k.shape)} on {q.device.type}, mask {None if mask is None else tuple(mask.shape)}: "
                         "use the sdpa or math backend for these")
    if not KERNEL.available():
        raise RuntimeError(f"limner's float32 CPU attention kernel is not available here: {KERNEL.failure}")
    return KERNEL.function("forward")(q, k, v, q.shape[-1] ** -0.5, query_block(q, k), KEY_BLOCK).transpose(1, 2)
