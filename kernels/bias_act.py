"""Bias + activation + gain + clamp in one op, with the semantics of StyleGAN2-ADA's
`bias_act` (Karras et al. 2020, "Training Generative Adversarial Networks with Limited
Data"): the discriminator's and generator's hot elementwise path.

Fused: one read of x, one write of y (eager: add, activation, mul, clamp: four passes).
The backward kernel recomputes x + b and writes dx = dy * f'(x + b) * gain * [not clamped];
it is itself an autograd Function whose backward is (again) that kernel for d(dy) plus the
f'' term through the eager reference, so R1's double backward works on every activation.
"""
import math

import torch
import torch.nn.functional as F

from ._backend import resolve, tl, triton

# name -> (function of (x, alpha), default alpha, default gain); gains keep the signal's
# second moment near 1 for unit-Gaussian input, as in StyleGAN2-ADA's table.
ACTIVATIONS = {
    "linear": (lambda x, a: x, 0.0, 1.0),
    "relu": (lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": (lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": (lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": (lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": (lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": (lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": (lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": (lambda x, a: F.silu(x), 0.0, math.sqrt(2)),
}


def bias_act_reference(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, act: str = "lrelu",
                       alpha: float | None = None, gain: float | None = None,
                       clamp: float | None = None) -> torch.Tensor:
    """act(x + b, alpha) * gain, then clamped to [-clamp, clamp]; b: [x.shape[dim]]."""
    fn, default_alpha, default_gain = _activation(act)
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias_act: bias of shape {tuple(b.shape)} does not fit dim {dim} of x "
                             f"{tuple(x.shape)}")
        x = x + b.reshape([-1 if i == dim % x.ndim else 1 for i in range(x.ndim)])
    x = fn(x, default_alpha if alpha is None else alpha)
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def _activation(act: str):
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


if triton is not None:
    @triton.jit
    def _act(z, ACT: tl.constexpr, alpha):
        """(f(z), f'(z)) in float32; ACT indexes ACTIVATIONS' order."""
        if ACT == 0:  # linear
            return z, tl.full(z.shape, 1.0, tl.float32)
        elif ACT == 1:  # relu
            return tl.maximum(z, 0.0), tl.where(z > 0, 1.0, 0.0)
        elif ACT == 2:  # lrelu
            return tl.where(z > 0, z, alpha * z), tl.where(z > 0, 1.0, alpha)
        elif ACT == 3:  # tanh = 2 sigmoid(2z) - 1
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            return t, 1.0 - t * t
        elif ACT == 4:  # sigmoid
            s = tl.sigmoid(z)
            return s, s * (1.0 - s)
        elif ACT == 5:  # elu
            e = tl.exp(tl.minimum(z, 0.0))
            return tl.where(z > 0, z, e - 1.0), tl.where(z > 0, 1.0, e)
        elif ACT == 6:  # selu (Klambauer et al. 2017)
            e = tl.exp(tl.minimum(z, 0.0))
            return (1.0507009873554805 * tl.where(z > 0, z, 1.6732632423543772 * (e - 1.0)),
                    1.0507009873554805 * tl.where(z > 0, 1.0, 1.6732632423543772 * e))
        elif ACT == 7:  # softplus, linear above 20 like torch
            return tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0)))), tl.sigmoid(z)
        else:  # swish
            s = tl.sigmoid(z)
            return z * s, s + z * s * (1.0 - s)

    @triton.jit
    def _pre_activation(x_ptr, b_ptr, offs, mask, C, INNER, HAS_BIAS: tl.constexpr):
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + (offs // INNER) % C, mask=mask, other=0.0).to(tl.float32)
        return z

    @triton.jit
    def _bias_act_forward(x_ptr, b_ptr, y_ptr, total, C, INNER, alpha, gain, clamp, ACT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        f, _ = _act(_pre_activation(x_ptr, b_ptr, offs, mask, C, INNER, HAS_BIAS), ACT, alpha)
        y = f * gain
        if HAS_CLAMP:
            y = tl.minimum(tl.maximum(y, -clamp), clamp)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_act_grad(dy_ptr, x_ptr, b_ptr, dx_ptr, total, C, INNER, alpha, gain, clamp, ACT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        f, df = _act(_pre_activation(x_ptr, b_ptr, offs, mask, C, INNER, HAS_BIAS), ACT, alpha)
        dx = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * df * gain
        if HAS_CLAMP:  # torch's clamp passes the gradient where |y| <= clamp
            dx = tl.where(tl.abs(f * gain) <= clamp, dx, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024
_ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def _launch(kernel, out, tensors, x, b, spec):
    dim, act, alpha, gain, clamp = spec
    inner = math.prod(x.shape[dim + 1:])
    kernel[(triton.cdiv(x.numel(), _BLOCK),)](*tensors, b if b is not None else x, out, x.numel(), x.shape[dim], inner,
                                              alpha, gain, clamp if clamp is not None else 0.0, ACT=_ACT_IDS[act],
                                              HAS_BIAS=b is not None, HAS_CLAMP=clamp is not None, BLOCK=_BLOCK)
    return out


def _reduce_to_bias(dz: torch.Tensor, dim: int, b: torch.Tensor) -> torch.Tensor:
    return dz.sum([i for i in range(dz.ndim) if i != dim]).to(b.dtype)


class BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, spec):
        ctx.save_for_backward(x, b)
        ctx.spec = spec
        return _launch(_bias_act_forward, torch.empty_like(x), (x,), x, b, spec)

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        dx = BiasActGrad.apply(dy.contiguous(), x, b, ctx.spec)
        db = _reduce_to_bias(dx, ctx.spec[0], b) if b is not None and ctx.needs_input_grad[1] else None
        return dx, db, None


class BiasActGrad(torch.autograd.Function):
    """dx = dy * d(bias_act)/dx; differentiable again (R1 needs d/dx of the gradient norm)."""

    @staticmethod
    def forward(ctx, dy, x, b, spec):
        ctx.save_for_backward(dy, x, b)
        ctx.spec = spec
        return _launch(_bias_act_grad, torch.empty_like(x), (dy, x), x, b, spec)

    @staticmethod
    def backward(ctx, d_dx):
        dy, x, b = ctx.saved_tensors
        dim, act, alpha, gain, clamp = ctx.spec
        d_dy = BiasActGrad.apply(d_dx.contiguous(), x, b, ctx.spec)
        if act in ("linear", "relu", "lrelu"):  # piecewise linear: f'' = 0, zeros as eager autograd gives
            d_z = torch.zeros_like(x) if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None
        else:
            d_z = d_dx * dy * _second_derivative(x, b, ctx.spec)
        db = _reduce_to_bias(d_z, dim, b) if b is not None and ctx.needs_input_grad[2] else None
        return d_dy, d_z if ctx.needs_input_grad[1] else None, db, None


def _second_derivative(x, b, spec) -> torch.Tensor:
    """gain * f''(x + b) where not clamped, through the eager reference (double backward is rare)."""
    dim, act, alpha, gain, clamp = spec
    with torch.enable_grad():
        z = x.detach().float().requires_grad_()
        y = bias_act_reference(z, None if b is None else b.detach().float(), dim, act, alpha, gain)
        (df,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        (d2f,) = torch.autograd.grad(df.sum(), z)
        if clamp is not None:
            d2f = d2f * (y.detach().abs() <= clamp)
    return d2f.to(x.dtype)


def bias_act(x, b=None, dim=1, act="lrelu", alpha=None, gain=None, clamp=None, backend="auto"):
    """Fused bias + activation; see bias_act_reference for the semantics."""
    _, default_alpha, default_gain = _activation(act)
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f"bias_act: bias of shape {tuple(b.shape)} does not fit dim {dim} of x {tuple(x.shape)}")
    if resolve("bias_act", backend, x) == "eager" or x.numel() == 0:
        return bias_act_reference(x, b, dim, act, alpha, gain, clamp)
    clamp = clamp if clamp is not None and clamp >= 0 else None
    spec = (dim % x.ndim, act, float(default_alpha if alpha is None else alpha),
            float(default_gain if gain is None else gain), None if clamp is None else float(clamp))
    return BiasAct.apply(x.contiguous(), None if b is None else b.contiguous(), spec)
