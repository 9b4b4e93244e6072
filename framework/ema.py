"""The exponential moving average of a model's weights, which sampling uses instead of the raw
weights (every recipe's trainer keeps one)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's weights, warmed up as in ADM (Dhariwal & Nichol
    2021: the decay ramps from ~0.1 to `decay` over the first steps); buffers (BatchNorm
    statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:  # a frozen weight (pretrained text encoder) is its own average
                ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
