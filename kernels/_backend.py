"""Which implementation a fused op runs: 'auto', 'triton' or 'eager', and what the Triton
kernels share (availability, launch sizes, dtype plumbing)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

BACKENDS = ("auto", "triton", "eager")
# the kernels compute in float32; float64 (gradcheck, tests) takes the eager reference
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none): the one place limner reads it (CPU flags for
    the kernels' rules and limner.pipeline.native_bf16, model names for results files)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# The two kinds of CPU the CPU kernels' `faster` rules were measured on differ where torch's own
# kernels run: an Intel Xeon with AMX (amx_bf16; two 512-bit FMA units, AMX tiles for bf16) and an
# AMD EPYC (Zen 4: avx512_bf16 without AMX, 512-bit vectors on 256-bit units), where torch's flash
# attention runs ~2.5x slower and limner's kernels win at more shapes
# (benchmarks/results/cpu-kernel-measurements.md has a table for each).
AMX = bool(re.search(r"\bamx_bf16\b", cpuinfo()))


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1. Elsewhere importing
# triton buys nothing and costs start-up time (benchmarks/results/cpu-kernel-measurements.md),
# so it is imported only where a kernel can run.
triton, tl, HAS_TRITON = None, None, False
if interpreting() or torch.cuda.is_available():
    try:  # triton is a Linux dependency; elsewhere every op runs its eager reference
        import triton
        import triton.language as tl  # noqa: F401 (imported by the kernel modules from here)
        HAS_TRITON = True
    except ImportError:  # pragma: no cover - exercised only where triton is missing
        pass


def resolve(op: str, backend: str, x: torch.Tensor, has_triton: bool = True) -> str:
    """'eager' or 'triton' for this call.

    LIMNER_KERNELS=eager|triton overrides `backend` everywhere (triton: for every op that has a
    kernel; on CPU tensors it needs TRITON_INTERPRET=1); 'auto' takes Triton on CUDA tensors of a
    Triton dtype, else the eager reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    forced = os.environ.get("LIMNER_KERNELS", "").lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"LIMNER_KERNELS={forced!r} is not a backend; valid: {', '.join(BACKENDS)}")
    if forced == "eager" or (forced == "triton" and not has_triton):  # ops with no kernel stay eager (forced_eager)
        return "eager"
    backend = forced or backend
    if backend == "eager":
        return "eager"
    usable = has_triton and HAS_TRITON and (x.is_cuda or interpreting()) and x.dtype in TRITON_DTYPES
    if backend == "triton":
        if not usable:
            where = "this op has no Triton kernel" if not has_triton else (
                f"tensors are on {x.device.type}; run on CUDA or set TRITON_INTERPRET=1" if not x.is_cuda
                and not interpreting() else
                "triton is not installed" if not HAS_TRITON else
                f"dtype {x.dtype} has no kernel (valid: float32, float16, bfloat16)")
            raise ValueError(f"{op}: cannot use backend 'triton': {where}; use backend='eager' or 'auto'")
        return "triton"
    return "triton" if usable and x.is_cuda else "eager"


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these (grad mode on and one of them, None skipped, requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def unmasked_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """What limner's forward-only attention kernels share in `fits`: q, k, v [B, H, L, D] of one head
    dim, k and v of one length, no mask, no gradient to take."""
    if mask is not None:
        return False
    if not (q.ndim == k.ndim == v.ndim == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]):
        return False
    return not wants_grad(q, k, v)


def trace_constant(fn):
    """torch.compiler.assume_constant_result's marker, set without importing torch._dynamo (which that
    function does: 1.2 s of a `limner sample` cold start): dynamo runs `fn` as it traces and keeps
    its result as a constant. The same attribute torch 2.13's decorator sets
    (torch/_dynamo/decorators.py); tests/test_diffusion.py's fullgraph=True compile before the
    registry is loaded fails if it stops working (dynamo would trace into plugin loading and break
    the graph)."""
    fn._dynamo_marked_constant = True
    return fn


def forced_eager() -> bool:
    """True where LIMNER_KERNELS forces a backend: ops with no Triton kernel then run their
    eager reference (for LIMNER_KERNELS=triton too)."""
    return os.environ.get("LIMNER_KERNELS", "").lower() in ("eager", "triton")


def block_size(n: int, cap: int = 1024, floor: int = 16) -> int:
    """A power-of-two tile of at least `floor` elements covering up to `cap` of n."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def num_programs_cap() -> int:
    """How many programs a reduction should split into: enough to fill an H100's 132 SMs a
    few times over; under the interpreter, few (each program is a Python loop)."""
    return 4 if interpreting() else 512
