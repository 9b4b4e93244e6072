"""GroupNorm, optional per-sample (1 + scale) / shift modulation, then SiLU: the UNet
ResBlock path. Only the eager reference exists so far; the Triton kernel plugs in here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float = 1e-5, scale: torch.Tensor | None = None,
                              shift: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, C, *]; weight, bias: [C]; scale, shift: [N, C] (FiLM as in ADM, Dhariwal & Nichol 2021)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    extra = (1,) * (x.ndim - 2)
    if scale is not None:
        y = y * (1 + scale.view(*scale.shape, *extra))
    if shift is not None:
        y = y + shift.view(*shift.shape, *extra)
    return F.silu(y)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, backend="auto"):
    """Fused GroupNorm (+ modulation) + SiLU; see group_norm_silu_reference for the semantics."""
    resolve("group_norm_silu", backend, x, has_triton=False)
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, scale, shift)
