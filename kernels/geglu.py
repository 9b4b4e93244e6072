"""GEGLU (Shazeer 2020, "GLU Variants Improve Transformer"): split the last dimension into
(a, b), return a * GELU(b) with the exact (erf) GELU. Fused: one read of x, one write of
the half-size output; eager materialises gelu(b) and the chunks' product separately. Triton's
kernel on CUDA; on the CPU, float32 takes a C++ kernel (cpu_geglu.cpp), forward and backward."""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._backend import forced_eager, resolve, tl, triton
from ._cpp import CppKernel


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)


if triton is not None:
    @triton.jit
    def _gelu_parts(b):
        """(gelu(b), gelu'(b)) in float32: gelu = b * Phi(b), gelu' = Phi(b) + b * phi(b)."""
        cdf = 0.5 * (1.0 + tl.math.erf(b * 0.7071067811865476))
        pdf = tl.exp(-0.5 * b * b) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return b * cdf, cdf + b * pdf

    @triton.jit
    def _geglu_forward(x_ptr, out_ptr, F_, BLOCK: tl.constexpr):
        row, col = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < F_
        a = tl.load(x_ptr + row * 2 * F_ + col, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + row * 2 * F_ + F_ + col, mask=mask, other=0.0).to(tl.float32)
        gelu, _ = _gelu_parts(b)
        tl.store(out_ptr + row * F_ + col, (a * gelu).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_backward(x_ptr, dout_ptr, dx_ptr, F_, BLOCK: tl.constexpr):
        row, col = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < F_
        a = tl.load(x_ptr + row * 2 * F_ + col, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + row * 2 * F_ + F_ + col, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + row * F_ + col, mask=mask, other=0.0).to(tl.float32)
        gelu, dgelu = _gelu_parts(b)
        tl.store(dx_ptr + row * 2 * F_ + col, (dout * gelu).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + row * 2 * F_ + F_ + col, (dout * a * dgelu).to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


class GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        half = x.shape[-1] // 2
        out = x.new_empty(*x.shape[:-1], half)
        grid = (x.numel() // x.shape[-1], triton.cdiv(half, _BLOCK))
        _geglu_forward[grid](x, out, half, BLOCK=_BLOCK)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        half = x.shape[-1] // 2
        dx = torch.empty_like(x)
        grid = (x.numel() // x.shape[-1], triton.cdiv(half, _BLOCK))
        _geglu_backward[grid](x, dout.contiguous(), dx, half, BLOCK=_BLOCK)
        return dx


# On the CPU, float32 (a training step's GEGLU; inference fuses GEGLU into its matmuls:
# onednn_geglu.py) takes a C++ kernel in place of the eager reference's six passes.
CPU_KERNEL = CppKernel("cpu_geglu.cpp", ["forward", "backward"], "GEGLU on the CPU runs its eager reference")


CPU_KERNEL.define("forward", "(Tensor x) -> Tensor", lambda x: x.new_empty(*x.shape[:-1], x.shape[-1] // 2))
CPU_KERNEL.define("backward", "(Tensor x, Tensor dout) -> Tensor", lambda x, dout: torch.empty_like(x))


def cpu_kernel_fits(x: torch.Tensor) -> bool:
    """A non-empty float32 CPU tensor."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0


class GEGLUCPU(torch.autograd.Function):
    """geglu on the CPU by cpu_geglu.cpp; under create_graph the backward is autograd's through
    geglu_reference, differentiable again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)  # the input itself (not a contiguous copy): create_graph differentiates through it
        return CPU_KERNEL.function("forward")(x.contiguous())

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (a gradient penalty): the reference's own gradient
            return torch.autograd.grad(geglu_reference(x), x, dout, create_graph=True)[0]
        return CPU_KERNEL.function("backward")(x.contiguous(), dout.contiguous())


def geglu(x, backend="auto"):
    """a * gelu(b) for x = [a, b] along the last dimension."""
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension of x must be even, got shape {tuple(x.shape)}")
    if resolve("geglu", backend, x) == "eager" or x.numel() == 0:
        if backend == "auto" and not forced_eager() and cpu_kernel_fits(x) and CPU_KERNEL.available():
            return GEGLUCPU.apply(x)
        return geglu_reference(x)
    return GEGLU.apply(x)

