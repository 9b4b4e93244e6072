"""Fused ops and attention implementations (torch and triton only; nothing from limner).

Each op has an eager reference with the same semantics and a `backend="auto"|"triton"|"eager"`
argument; LIMNER_KERNELS=eager forces the reference everywhere.
"""
from .adaln import adaln_modulate, gated_residual
from .attention import attention_math, attention_sdpa
from .geglu import geglu
from .group_norm_silu import group_norm_silu

__all__ = ["adaln_modulate", "attention_math", "attention_sdpa", "gated_residual", "geglu", "group_norm_silu"]
