"""GEGLU's projection on the CPU as two oneDNN matmuls whose epilogues do the rest.

A GEGLU feed-forward (Shazeer 2020) projects x to twice its inner width, splits the result into
(h, gate) and returns h * gelu(gate). Eager PyTorch writes the whole projection, reads it back for
the erf GELU, writes that, and reads both for the product: four passes over tensors of
[rows, inner] after the matmul (at Stable Diffusion 1.5's 64x64 latent, 8,192 rows by 1,280).
Here the weight's two halves go to oneDNN as two matmuls over the same x: the gate's with the
exact (erf) GELU fused into its epilogue, then the projection's with a binary multiply by that
result fused into its own, so each output element is written once (mkldnn's _linear_pointwise,
the ops inductor's CPU fusion emits). The halves are views of the weight: no copy, no cache.

The GELU sees the float32 accumulator rather than the projection rounded to the output dtype,
so in bfloat16 the bits differ from eager's, both within bf16 rounding of a float64 reference
(tests/test_kernels.py); in float32 they agree to a few ulps. Measured per shape:
benchmarks/results/cpu-kernel-measurements.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import forced_eager

BACKENDS = ("auto", "onednn", "eager")
_ONEDNN = torch.backends.mkldnn.is_available()


def linear_geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    h, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(gate)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute x in here: bf16 under CPU bf16 autocast, else x's own."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and x.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU float32 or bfloat16 (after autocast) without autograd, outside a torch.compile trace
    (inductor fuses for itself), an even number of output features."""
    dtype = compute_dtype(x)
    return (_ONEDNN and not torch.compiler.is_compiling() and x.device.type == weight.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16) and weight.ndim == 2 and weight.shape[0] % 2 == 0
            and x.shape[-1] == weight.shape[1] and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                   or (bias is not None and bias.requires_grad))))


def linear_geglu_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """h * gelu(gate) for (h, gate) = F.linear(x, weight, bias) split in two, in two fused matmuls."""
    dtype, half = compute_dtype(x), weight.shape[0] // 2
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    w = weight.to(dtype)  # autocast's cast of a float32 weight; a held bf16 weight stays as it is
    b = (None, None) if bias is None else (bias[:half].to(dtype), bias[half:].to(dtype))
    gate = torch.ops.mkldnn._linear_pointwise(x2, w[half:], b[1], "gelu", [], "none")
    out = torch.ops.mkldnn._linear_pointwise.binary(x2, gate, w[:half], b[0], "mul")
    return out.reshape(*x.shape[:-1], half)


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """GEGLU of F.linear(x, weight, bias): the two fused oneDNN matmuls where they fit (CPU
    inference), else limner.kernels.geglu of limner.kernels.linear (Triton's GEGLU on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_geglu: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "onednn":
        if not fits(x, weight, bias):
            raise ValueError(f"linear_geglu: backend 'onednn' takes float32 or bfloat16 CPU tensors without "
                             f"autograd and a weight of an even number of rows, got {x.dtype} x on {x.device.type}, "
                             f"weight {tuple(weight.shape)}; use backend='eager' or 'auto'")
        return linear_geglu_onednn(x, weight, bias)
    if backend == "auto" and not forced_eager() and fits(x, weight, bias):
        return linear_geglu_onednn(x, weight, bias)
    from .geglu import geglu
    from .onednn_linear import linear

    eager = "eager" if backend == "eager" else "auto"
    return geglu(linear(x, weight, bias, backend=eager), backend=eager)
