"""The DiT block's elementwise path (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): adaLN modulation and adaLN-zero's gated residual, fused.

adaln_modulate: one program per token row (the row fits one tile: D <= 8192), statistics
and modulation in registers; eager runs layer_norm + mul + add as three passes.
Backward: one program per (sample, chunk of rows) so the per-sample dscale / dshift sums
stay in registers; the chunks' partial sums are added by torch (B x chunks x D, small).
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._backend import block_size, num_programs_cap, resolve, tl, triton


def adaln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                             eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) without affine, * (1 + scale) + shift. x: [B, L, D]; shift, scale: [B, D]."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with gate [B, D] broadcast over the tokens of x, y: [B, L, D]."""
    return x + gate.unsqueeze(1) * y


if triton is not None:
    @triton.jit
    def _adaln_forward(x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, L, D, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        b = row // L
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
        scale = tl.load(scale_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row.to(tl.int64) * D + cols, (xc * rstd * (1.0 + scale) + shift).to(y_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _adaln_backward(x_ptr, scale_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dscale_ptr, dshift_ptr,
                        L, D, ROWS, CHUNKS, BLOCK_D: tl.constexpr):
        b, chunk = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        scale = tl.load(scale_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        dscale = tl.zeros((BLOCK_D,), tl.float32)
        dshift = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(chunk * ROWS, tl.minimum(chunk * ROWS + ROWS, L)):
            row = b * L + i
            offs = row.to(tl.int64) * D + cols
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
            dxhat = dy * (1.0 + scale)
            dx = (dxhat - tl.sum(dxhat, 0) / D - xhat * (tl.sum(dxhat * xhat, 0) / D)) * tl.load(rstd_ptr + row)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dscale += dy * xhat
            dshift += dy
        out = (b * CHUNKS + chunk) * D + cols
        tl.store(dscale_ptr + out, dscale, mask=mask)
        tl.store(dshift_ptr + out, dshift, mask=mask)

    @triton.jit
    def _gated_forward(x_ptr, gate_ptr, y_ptr, out_ptr, total, LD, D, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        gate = tl.load(gate_ptr + (offs // LD) * D + offs % D, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_backward(gate_ptr, y_ptr, dout_ptr, dy_ptr, dgate_ptr, L, D, ROWS, CHUNKS, BLOCK_D: tl.constexpr):
        b, chunk, col0 = tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_D
        cols = col0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        gate = tl.load(gate_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        dgate = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(chunk * ROWS, tl.minimum(chunk * ROWS + ROWS, L)):
            offs = (b * L + i).to(tl.int64) * D + cols
            dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + offs, (dout * gate).to(dy_ptr.dtype.element_ty), mask=mask)
            dgate += dout * tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dgate_ptr + (b * CHUNKS + chunk) * D + cols, dgate, mask=mask)


def _chunks(batch: int, length: int) -> tuple[int, int]:
    """(rows per program, programs per sample) for the per-sample reductions."""
    chunks = max(1, min(length, num_programs_cap() // max(batch, 1)))
    rows = -(-length // chunks)
    return rows, -(-length // rows)


class AdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        b, length, d = x.shape
        y = torch.empty_like(x)
        mean = torch.empty(b * length, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _adaln_forward[(b * length,)](x, shift, scale, y, mean, rstd, length, d, eps, BLOCK_D=block_size(d, cap=8192))
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        b, length, d = x.shape
        rows, chunks = _chunks(b, length)
        dx = torch.empty_like(x)
        partial = torch.empty(2, b, chunks, d, device=x.device, dtype=torch.float32)
        _adaln_backward[(b, chunks)](x, scale, dy.contiguous(), mean, rstd, dx, partial[0], partial[1],
                                     length, d, rows, chunks, BLOCK_D=block_size(d, cap=8192))
        dscale, dshift = partial.sum(2)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


class GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        x, gate, y = x.contiguous(), gate.contiguous(), y.contiguous()
        out = torch.empty_like(x)
        block = 1024
        _gated_forward[(triton.cdiv(x.numel(), block),)](x, gate, y, out, x.numel(), x.shape[1] * x.shape[2],
                                                         x.shape[2], BLOCK=block)
        ctx.save_for_backward(gate, y)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        b, length, d = y.shape
        rows, chunks = _chunks(b, length)
        block_d = block_size(d, cap=1024)
        dy = torch.empty_like(y)
        partial = torch.empty(b, chunks, d, device=y.device, dtype=torch.float32)
        _gated_backward[(b, chunks, triton.cdiv(d, block_d))](gate, y, dout.contiguous(), dy, partial, length, d,
                                                                rows, chunks, BLOCK_D=block_d)
        return dout, partial.sum(1).to(gate.dtype), dy


def _check(op: str, x: torch.Tensor, **per_sample: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be [B, L, D], got shape {tuple(x.shape)}")
    for name, t in per_sample.items():
        if t.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"{op}: {name} of shape {tuple(t.shape)}, expected [B, D] = "
                             f"{[x.shape[0], x.shape[2]]}")


def adaln_modulate(x, shift, scale, eps=1e-6, backend="auto"):
    """adaLN modulation; see adaln_modulate_reference."""
    _check("adaln_modulate", x, shift=shift, scale=scale)
    if resolve("adaln_modulate", backend, x) == "eager":
        return adaln_modulate_reference(x, shift, scale, eps)
    return AdaLNModulate.apply(x, shift, scale, eps)


def gated_residual(x, gate, y, backend="auto"):
    """adaLN-zero's gated residual; see gated_residual_reference."""
    _check("gated_residual", x, gate=gate)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y of shape {tuple(y.shape)} differs from x {tuple(x.shape)}")
    if resolve("gated_residual", backend, x) == "eager":
        return gated_residual_reference(x, gate, y)
    return GatedResidual.apply(x, gate, y)
