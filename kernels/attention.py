"""Attention implementations the dispatcher chooses between: q, k, v [B, H, L, Dh], an
optional boolean mask broadcastable to [B, H, Lq, Lk] (True = attend)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in plain PyTorch, accumulated in float32 (Vaswani et al. 2017)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention (flash / memory-efficient / math, chosen by torch)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
