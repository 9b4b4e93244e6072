"""The attention dispatcher: one call site for every model, many registered backends.

`backend=None` takes LIMNER_ATTENTION if set, else the preferred backend for the device.
Until the GPU benchmarks give a measured preference table, that is `sdpa` everywhere
(torch picks flash / memory-efficient / math inside it).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .registry import create

_built: dict[str, Callable] = {}


def preferred_backend(q: torch.Tensor) -> str:
    """The backend `auto` uses for this device and shape."""
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, H, L, Dh]; mask True = attend."""
    name = backend or os.environ.get("LIMNER_ATTENTION") or preferred_backend(q)
    if name not in _built:
        _built[name] = create("attention_backends", name)
    return _built[name](q, k, v, mask)
