"""GroupNorm (Wu & He 2018), optional per-sample (1 + scale) / shift modulation (FiLM as in
ADM, Dhariwal & Nichol 2021), then SiLU: the UNet ResBlock path, fused.

Eager, this is five kernels and four full-size intermediates; fused, the forward reads x
twice (statistics, then normalise + modulate + activate, the second read mostly from L2)
and writes y once; the backward reads x and dy twice and writes dx once.
One Triton program owns one (sample, group): the group's elements are contiguous in
[N, C, *] memory, so both passes stream. Tiles are [channels, positions] so per-channel
sums (weight, bias, scale, shift gradients) fall out of a row reduction.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._backend import block_size, forced_eager, resolve, tl, triton
from ._cpp import CppKernel


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float = 1e-5, scale: torch.Tensor | None = None,
                              shift: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, C, *]; weight, bias: [C]; scale, shift: [N, C] (FiLM as in ADM, Dhariwal & Nichol 2021)."""
    if weight is None and bias is not None:  # torch 2.13's CPU group_norm backward fails on (None, bias)
        weight = torch.ones_like(bias)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    extra = (1,) * (x.ndim - 2)
    if scale is not None:
        y = y * (1 + scale.view(*scale.shape, *extra))
    if shift is not None:
        y = y + shift.view(*shift.shape, *extra)
    return F.silu(y)


if triton is not None:
    @triton.jit
    def _tile(base, c0, s0, CPG, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Offsets and mask of the [BLOCK_C, BLOCK_S] tile at (channel c0, position s0) of a group."""
        cs = c0 + tl.arange(0, BLOCK_C)
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (cs[:, None] < CPG) & (ss[None, :] < S)
        return base + cs[:, None] * S + ss[None, :], mask, cs

    @triton.jit
    def _modulated(x, mean, rstd, w_ptr, b_ptr, sc_ptr, sh_ptr, chan, cmask, row,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """(xhat, h = xhat * w + b, m = 1 + scale, u = h * m + shift) for a tile, all float32."""
        xhat = (x - mean) * rstd
        h = xhat
        if HAS_W:
            h = h * tl.load(w_ptr + chan, mask=cmask, other=1.0).to(tl.float32)[:, None]
        if HAS_B:
            h = h + tl.load(b_ptr + chan, mask=cmask, other=0.0).to(tl.float32)[:, None]
        m = tl.full(h.shape, 1.0, tl.float32)
        if HAS_SCALE:
            m = m + tl.load(sc_ptr + row + chan, mask=cmask, other=0.0).to(tl.float32)[:, None]
        u = h * m
        if HAS_SHIFT:
            u = u + tl.load(sh_ptr + row + chan, mask=cmask, other=0.0).to(tl.float32)[:, None]
        return xhat, h, m, u

    @triton.jit
    def _gns_forward(x_ptr, y_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr, C, S, CPG, G, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)  # = n * G + g
        n, g = pid // G, pid % G
        base = n.to(tl.int64) * C * S + g * CPG * S
        count = CPG * S
        # statistics around a pivot (the group's first element): less cancellation than raw sums
        pivot = tl.load(x_ptr + base).to(tl.float32)
        acc = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_sq = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for c0 in range(0, CPG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs, mask, _ = _tile(base, c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                v = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
                acc += v
                acc_sq += v * v
        mean_shifted = tl.sum(tl.sum(acc, 1), 0) / count
        var = tl.maximum(tl.sum(tl.sum(acc_sq, 1), 0) / count - mean_shifted * mean_shifted, 0.0)
        mean = mean_shifted + pivot
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        for c0 in range(0, CPG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs, mask, cs = _tile(base, c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                _, _, _, u = _modulated(x, mean, rstd, w_ptr, b_ptr, sc_ptr, sh_ptr, g * CPG + cs, cs < CPG, n * C,
                                        HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
                tl.store(y_ptr + offs, (u * tl.sigmoid(u)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_terms(x_ptr, dy_ptr, offs, mask, mean, rstd, w_ptr, b_ptr, sc_ptr, sh_ptr, chan, cmask, row,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """For a tile: xhat, h, du = dL/du, dh = dL/dh, dxhat = dL/dxhat (zero outside the tile's mask)."""
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, h, m, u = _modulated(x, mean, rstd, w_ptr, b_ptr, sc_ptr, sh_ptr, chan, cmask, row,
                                   HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        sig = tl.sigmoid(u)
        du = tl.where(mask, dy * sig * (1.0 + u * (1.0 - sig)), 0.0)
        dh = du * m
        dxhat = dh
        if HAS_W:
            dxhat = dh * tl.load(w_ptr + chan, mask=cmask, other=1.0).to(tl.float32)[:, None]
        return tl.where(mask, xhat, 0.0), h, du, dh, dxhat

    @triton.jit
    def _gns_backward(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr,
                      dw_ptr, db_ptr, dsc_ptr, dsh_ptr, C, S, CPG, G,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """dx, and per-(sample, channel) sums: dw, db (summed over samples by the caller), dscale, dshift."""
        pid = tl.program_id(0)
        n, g = pid // G, pid % G
        base = n.to(tl.int64) * C * S + g * CPG * S
        mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
        sum_dxhat = tl.zeros((BLOCK_C,), tl.float32)
        sum_dxhat_xhat = tl.zeros((BLOCK_C,), tl.float32)
        for c0 in range(0, CPG, BLOCK_C):
            d_w = tl.zeros((BLOCK_C,), tl.float32)
            d_b = tl.zeros((BLOCK_C,), tl.float32)
            d_sc = tl.zeros((BLOCK_C,), tl.float32)
            d_sh = tl.zeros((BLOCK_C,), tl.float32)
            for s0 in range(0, S, BLOCK_S):
                offs, mask, cs = _tile(base, c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                xhat, h, du, dh, dxhat = _backward_terms(x_ptr, dy_ptr, offs, mask, mean, rstd, w_ptr, b_ptr, sc_ptr,
                                                         sh_ptr, g * CPG + cs, cs < CPG, n * C,
                                                         HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
                sum_dxhat += tl.sum(dxhat, 1)
                sum_dxhat_xhat += tl.sum(dxhat * xhat, 1)
                d_w += tl.sum(dh * xhat, 1)
                d_b += tl.sum(dh, 1)
                d_sc += tl.sum(du * h, 1)
                d_sh += tl.sum(du, 1)
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < CPG
            out = n * C + g * CPG + cs
            tl.store(dw_ptr + out, d_w, mask=cmask)
            tl.store(db_ptr + out, d_b, mask=cmask)
            tl.store(dsc_ptr + out, d_sc, mask=cmask)
            tl.store(dsh_ptr + out, d_sh, mask=cmask)
        count = CPG * S
        mean_dxhat = tl.sum(sum_dxhat, 0) / count
        mean_dxhat_xhat = tl.sum(sum_dxhat_xhat, 0) / count
        for c0 in range(0, CPG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs, mask, cs = _tile(base, c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                xhat, _, _, _, dxhat = _backward_terms(x_ptr, dy_ptr, offs, mask, mean, rstd, w_ptr, b_ptr, sc_ptr,
                                                       sh_ptr, g * CPG + cs, cs < CPG, n * C,
                                                       HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
                dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(cpg: int, s: int) -> tuple[int, int]:
    block_s = block_size(s, cap=512, floor=1)
    return block_s, block_size(cpg, cap=max(1, 2048 // block_s), floor=1)


class GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, scale, shift):
        x = x.contiguous()
        n, c, s = x.shape[0], x.shape[1], x[0, 0].numel()
        params = [t.contiguous() if t is not None else None for t in (weight, bias, scale, shift)]
        y = torch.empty_like(x)
        mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_s, block_c = _blocks(c // num_groups, s)
        _gns_forward[(n * num_groups,)](x, y, *[p if p is not None else x for p in params], mean, rstd,
                                        c, s, c // num_groups, num_groups, eps,
                                        *[p is not None for p in params], BLOCK_C=block_c, BLOCK_S=block_s)
        ctx.save_for_backward(x, *[p if p is not None else torch.empty(0) for p in params], mean, rstd)
        ctx.present, ctx.num_groups = [p is not None for p in params], num_groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, *params, mean, rstd = ctx.saved_tensors
        n, c, s = x.shape[0], x.shape[1], x[0, 0].numel()
        g = ctx.num_groups
        dx = torch.empty_like(x)
        sums = torch.empty(4, n, c, device=x.device, dtype=torch.float32)
        block_s, block_c = _blocks(c // g, s)
        _gns_backward[(n * g,)](x, dy.contiguous(), dx, *[p if ok else x for p, ok in zip(params, ctx.present)],
                                mean, rstd, *sums, c, s, c // g, g, *ctx.present, BLOCK_C=block_c, BLOCK_S=block_s)
        w, b, sc, sh = params
        dw, db = (sums[0].sum(0).to(w.dtype), sums[1].sum(0).to(b.dtype))
        grads = (dw, db, sums[2].to(sc.dtype), sums[3].to(sh.dtype))
        dw, db, dsc, dsh = (grad if ok and ctx.needs_input_grad[i] else None
                            for grad, ok, i in zip(grads, ctx.present, (2, 3, 5, 6)))
        return dx, None, dw, db, None, dsc, dsh


def _check(x, num_groups, weight, bias, scale, shift) -> None:
    if x.ndim < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu: x of shape {tuple(x.shape)} needs [N, C, *] with C divisible by "
                         f"num_groups={num_groups}")
    for name, t, shape in (("weight", weight, x.shape[1:2]), ("bias", bias, x.shape[1:2]),
                           ("scale", scale, x.shape[:2]), ("shift", shift, x.shape[:2])):
        if t is not None and t.shape != shape:
            raise ValueError(f"group_norm_silu: {name} of shape {tuple(t.shape)}, expected {tuple(shape)}")


# On the CPU, channels-last float32 activations (the UNet's) take a C++ kernel instead of the eager
# reference: cpu_group_norm_silu.cpp, the same math, forward and backward in two passes each
# (torch's channels-last GroupNorm backward is the slow path: benchmarks/results/cpu-kernel-measurements.md).
CPU_KERNEL = CppKernel("cpu_group_norm_silu.cpp", ["forward", "backward"],
                       "GroupNorm + SiLU on the CPU runs its eager reference")


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


CPU_KERNEL.define("forward", "(Tensor x, int G, Tensor weight, Tensor bias, float eps, Tensor scale, Tensor shift) "
                  "-> Tensor[]", lambda x, G, *_: [_like(x), x.new_empty(x.shape[0], G), x.new_empty(x.shape[0], G)])
CPU_KERNEL.define("backward", "(Tensor dy, Tensor x, int G, Tensor weight, Tensor bias, Tensor scale, Tensor shift, "
                  "Tensor mean, Tensor rstd) -> Tensor[]", lambda dy, x, *_: [_like(x), x.new_empty(4, *x.shape[:2])])


def cpu_kernel_fits(x, *params) -> bool:
    """Float32 channels-last [N, C, H, W] CPU activations with C a multiple of 16, and every given
    parameter float32 on the CPU."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] % 16 == 0
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last)
            and all(p is None or (p.device.type == "cpu" and p.dtype == torch.float32) for p in params))


class GroupNormSiLUCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, scale, shift):
        params = [t.contiguous() if t is not None else torch.empty(0) for t in (weight, bias, scale, shift)]
        y, mean, rstd = CPU_KERNEL.function("forward")(x, num_groups, params[0], params[1], eps, params[2], params[3])
        ctx.save_for_backward(x, *params, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, b, sc, sh, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx, sums = CPU_KERNEL.function("backward")(dy, x, ctx.num_groups, w, b, sc, sh, mean, rstd)
        needs = ctx.needs_input_grad
        return (dx, None, sums[0].sum(0) if needs[2] else None, sums[1].sum(0) if needs[3] else None, None,
                sums[2] if needs[5] else None, sums[3] if needs[6] else None)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, backend="auto"):
    """Fused GroupNorm (+ modulation) + SiLU; see group_norm_silu_reference for the semantics."""
    _check(x, num_groups, weight, bias, scale, shift)
    if resolve("group_norm_silu", backend, x) == "eager":
        if backend == "auto" and not forced_eager() and cpu_kernel_fits(x, weight, bias, scale, shift) \
                and CPU_KERNEL.available():
            return GroupNormSiLUCPU.apply(x, num_groups, weight, bias, eps, scale, shift)
        return group_norm_silu_reference(x, num_groups, weight, bias, eps, scale, shift)
    return GroupNormSiLU.apply(x, num_groups, weight, bias, eps, scale, shift)
