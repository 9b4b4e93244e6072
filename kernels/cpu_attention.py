"""limner's fused CPU attention at head dim 16: cpu_attention.cpp (AVX-512), forward and backward.

attention_cpu(q, k, v, mask) = softmax(q k^T / 4) v for float32 CPU tensors q, k, v [B, H, L, 16]
(any strides with the last dim contiguous) and an optional key mask broadcastable to [B, 1, 1, Lk]
(True = attend). The C++ source is compiled the first time it is needed and imported
from the cache afterwards (kernels/_cpp.py: about 20 s once, needs a C++ compiler; later
processes import it in ~1 ms, so a `limner sample` start stays fast). `fits` says whether
inputs can take it; the attention dispatcher's `auto` takes it on the CPU for those
(framework/attention.py), and where it cannot be built it says so once and uses torch's sdpa.

Its speed against torch's CPU flash kernel: benchmarks/results/cpu-kernel-measurements.md.
"""
from __future__ import annotations

import torch

from ._cpp import CppKernel

HEAD_DIM = 16
KERNEL = CppKernel("cpu_attention.cpp", ["forward", "backward"],
                   "attention on the CPU uses torch's sdpa (slower at head dim 16)")
KERNEL.define("forward", "(Tensor q, Tensor k, Tensor v, Tensor bias, float scale) -> Tensor[]",
              lambda q, k, v, bias, scale: [q.new_empty(q.shape[0], q.shape[2], q.shape[1], HEAD_DIM),
                                            q.new_empty(q.shape[:3])])
KERNEL.define("backward", "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor out, Tensor lse, "
              "float scale) -> Tensor[]",
              lambda dout, q, k, v, *_: [q.new_empty(*q.shape[:3], HEAD_DIM), k.new_empty(*k.shape[:3], HEAD_DIM),
                                        k.new_empty(*k.shape[:3], HEAD_DIM)])


def key_bias(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor:
    """A boolean key mask [B|1, 1, 1, Lk] as the kernel's additive [B, Lk] bias (0 / -inf); an empty
    tensor for no mask."""
    if mask is None:
        return torch.empty(0)
    keep = mask.expand(batch, 1, 1, keys).reshape(batch, keys)
    return torch.zeros(batch, keys, device=mask.device).masked_fill_(~keep, float("-inf"))


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """Whether attention_cpu takes these inputs: float32 CPU tensors, head dim 16, last dim
    contiguous, a key mask or none."""
    shapes_ok = q.ndim == k.ndim == v.ndim == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1] == HEAD_DIM \
        and k.shape[:3] == v.shape[:3] and q.shape[:2] == k.shape[:2] and k.shape[2] > 0
    tensors_ok = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v))
    mask_ok = mask is None or (mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[1] == mask.shape[2] == 1
                               and mask.shape[0] in (1, q.shape[0]) and mask.shape[3] in (1, k.shape[2]))
    return shapes_ok and tensors_ok and mask_ok


class CPUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias):
        scale = q.shape[-1] ** -0.5
        out, lse = KERNEL.function("forward")(q, k, v, bias, scale)
        out = out.transpose(1, 2)  # [B, Lq, H, D] memory: "b h l d -> b l (h d)" after this is a view
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = KERNEL.function("backward")(dout, q, k, v, bias, out, lse, q.shape[-1] ** -0.5)
        return dq, dk, dv, None


def attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(16)) v with limner's CPU kernel; q, k, v [B, H, L, 16] float32 on the
    CPU, mask a key mask broadcastable to [B, 1, 1, Lk] (True = attend) or None."""
    if not fits(q, k, v, mask):
        raise ValueError(f"attention_cpu takes float32 CPU q, k, v [B, H, L, {HEAD_DIM}] with the last dim "
                         f"contiguous and a boolean key mask [B|1, 1, 1, Lk] or none; got q {tuple(q.shape)} "
                         f"{q.dtype} on {q.device.type}, mask {None if mask is None else tuple(mask.shape)}: use "
                         "the sdpa or math backend for these")
    if not KERNEL.available():
        raise RuntimeError(f"limner's CPU attention kernel is not available here: {KERNEL.failure}")
    return CPUAttention.apply(q, k, v, key_bias(mask, q.shape[0], k.shape[2]))
