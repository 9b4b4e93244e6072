"""Which implementation a fused op runs: 'auto', 'triton' or 'eager'."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "eager")


def resolve(op: str, backend: str, x: torch.Tensor, has_triton: bool) -> str:
    """'eager' or 'triton' for this call. LIMNER_KERNELS=eager forces the reference everywhere;
    'auto' takes Triton on CUDA where the op has a Triton kernel, else the eager reference."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if os.environ.get("LIMNER_KERNELS", "").lower() == "eager":
        return "eager"
    if backend == "triton":
        if not has_triton:
            raise ValueError(f"{op}: no Triton kernel yet; use backend='eager' or 'auto'")
        return "triton"
    if backend == "auto" and has_triton and x.is_cuda:
        return "triton"
    return "eager"
