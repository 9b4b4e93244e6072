"""limner's bfloat16 attention for the CPU, forward only: cpu_flash_bf16.cpp (oneDNN's batch-reduce
GEMMs from torch's cpublas, on AMX tiles or avx512_bf16, with a two-pass online softmax between them).

attention_cpu_bf16(q, k, v) = softmax(q k^T / sqrt(D)) v for bf16 CPU tensors [B, H, L, D] without a
mask, D even, the key count a multiple of 32, no gradient to take, on a CPU where torch's cpublas
runs oneDNN's bf16 GEMMs (AMX's amx_bf16, or avx512_bf16 alone as AMD's Zen 4). `fits` says which inputs it
takes; the attention dispatcher's `auto` ranks it first on the CPU at the shapes where it was
measured faster than torch's flash kernel (`faster`, benchmarks/results/cpu-kernel-measurements.md)
and leaves the others to torch. Built at first use like the other C++ kernels (kernels/_cpp.py).
"""
from __future__ import annotations

import torch

from ._backend import AMX, trace_constant, unmasked_inference
from ._cpp import CppKernel

KERNEL = CppKernel("cpu_flash_bf16.cpp", ["forward", "available"],
                   "bfloat16 attention on the CPU uses torch's sdpa", flags=("-mavx512bf16",))
KERNEL.define("forward", "(Tensor q, Tensor k, Tensor v, float scale) -> Tensor",
              lambda q, k, v, scale: q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
NO_GEMM = "torch runs no batch-reduce GEMM for bf16 on this CPU (it needs AMX or avx512_bf16)"


@trace_constant
def runs() -> bool:
    """Whether the kernel is built here and the CPU runs its bf16 GEMMs; a constant to a
    torch.compile trace."""
    module = KERNEL.module()
    return module is not None and module.available()


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """Whether attention_cpu_bf16 takes these: bf16 CPU q, k, v [B, H, L, D] of one head dim, D even
    and at most 512, last dims contiguous, keys a multiple of 32, no mask, no gradient. (Keys and
    values at an odd offset are copied by the kernel itself, so that this check reads no
    data_ptr() and holds inside a torch.compile trace. Whether the CPU runs the kernel is `runs()`.)"""
    if not unmasked_inference(q, k, v, mask):
        return False
    d, keys = q.shape[-1], k.shape[2]
    return (d % 2 == 0 and 0 < d <= 512 and keys > 0 and keys % 32 == 0 and q.numel() > 0
            and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in (q, k, v)))


def faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Where the kernel measured faster than torch's flash kernel (benchmarks/attention_bf16.py,
    tables in benchmarks/results/cpu-kernel-measurements.md). With AMX (Intel Xeon): 2,048 keys or
    more at head dims up to 64 (Stable Diffusion's 64x64 latent pixels: 1.21-1.25x); at 1,024 keys
    the two tie, at head dim 128, fewer keys and the VAE's one 512-wide head torch's is faster.
    On avx512_bf16 alone (AMD EPYC, Zen 4): every measured shape, 64 to 4,096 keys at head dims 40
    to 512, 2.1-2.8x (torch's bf16 kernel runs there at ~80-170 GFLOP/s)."""
    return not AMX or (k.shape[2] >= 2048 and q.shape[-1] <= 64)  # (AMX: kernels/_backend.py)


def attention_cpu_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with limner's bf16 CPU kernel ([B, H, Lq, D] out, a view of
    [B, Lq, H, D] memory so that "b h l d -> b l (h d)" costs nothing)."""
    if not fits(q, k, v, mask):
        raise ValueError(f"attention_cpu_bf16 takes bfloat16 CPU q, k, v [B, H, L, D] with D even (<= 512), the "
                         f"key count a multiple of 32, the last dim contiguous, no mask and no gradient; got q "
                         f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} on {q.device.type}, "
                         f"mask {None if mask is None else tuple(mask.shape)}: use the sdpa or math backend for these")
    if not runs():
        raise RuntimeError(f"limner's bf16 CPU attention kernel is not available here: "
                           f"{KERNEL.failure or NO_GEMM}")
    return KERNEL.function("forward")(q, k, v, q.shape[-1] ** -0.5).transpose(1, 2)
