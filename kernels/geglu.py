"""GEGLU (Shazeer 2020): split the last dimension into (a, b), return a * GELU(b)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)


def geglu(x, backend="auto"):
    """a * gelu(b) for x = [a, b] along the last dimension."""
    resolve("geglu", backend, x, has_triton=False)
    return geglu_reference(x)
