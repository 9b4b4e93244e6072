"""The DiT block's elementwise path (Peebles & Xie 2023): adaLN modulation and the gated
residual. Eager references for now; the Triton kernels plug in here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve


def adaln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                             eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) without affine, * (1 + scale) + shift. x: [B, L, D]; shift, scale: [B, D]."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln_modulate(x, shift, scale, eps=1e-6, backend="auto"):
    """adaLN modulation; see adaln_modulate_reference."""
    resolve("adaln_modulate", backend, x, has_triton=False)
    return adaln_modulate_reference(x, shift, scale, eps)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with gate [B, D] broadcast over the tokens of x, y: [B, L, D]."""
    return x + gate.unsqueeze(1) * y


def gated_residual(x, gate, y, backend="auto"):
    """adaLN-zero's gated residual; see gated_residual_reference."""
    resolve("gated_residual", backend, x, has_triton=False)
    return gated_residual_reference(x, gate, y)
