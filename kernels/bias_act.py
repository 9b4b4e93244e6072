"""Bias + activation + gain + clamp in one op, with the semantics of StyleGAN2-ADA's
`bias_act` (Karras et al. 2020, "Training Generative Adversarial Networks with Limited
Data"): the discriminator's and generator's hot elementwise path. Only the eager reference
exists so far (autograd gives the double backward R1 needs); the Triton kernel plugs in here."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import resolve

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


def bias_act(x, b=None, dim=1, act="lrelu", alpha=None, gain=None, clamp=None, backend="auto"):
    """Fused bias + activation; see bias_act_reference for the semantics."""
    resolve("bias_act", backend, x, has_triton=False)
    return bias_act_reference(x, b, dim, act, alpha, gain, clamp)
