"""Training health: the non-finite guard (a step whose loss or gradients hold NaN/inf is skipped
or stops the run) and the divergence watch (weights or loss that blow up while staying finite).
TrainerBase.fit consults both, so no recipe's step re-implements them."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .errors import LimnerError


class NonFinite:
    """The non-finite policy: counts bad steps in a row and stops the run with a clear message."""

    POLICIES = ("skip", "stop")

    def __init__(self, policy: str, limit: int):
        if policy not in self.POLICIES:
            raise LimnerError(f"train.nonfinite must be one of {', '.join(self.POLICIES)}, got {policy!r}")
        self.policy, self.limit, self.in_a_row, self.skipped = policy, limit, 0, 0
        self.last_good: tuple[int, float] | None = None

    def check(self, step: int, loss: float, grad_norm: float, out: Path) -> bool:
        """True when the step may update the weights; raises when the run must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row, self.last_good = 0, (step, loss)
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.policy == "stop" or self.in_a_row >= self.limit:
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            since = f"; the last finite loss was {self.last_good[1]:.4g} at step {self.last_good[0]}" \
                if self.last_good else ""
            raise LimnerError(
                f"training stopped at step {step}: {what} ({self.in_a_row} non-finite update"
                f"{'s' if self.in_a_row > 1 else ''} in a row, policy {self.policy!r}{since}). The checkpoints in "
                f"{out / 'checkpoints'} hold only finite weights and resume from the last one. Usual causes: "
                "train.lr too high, no warm-up, or bad data.")
        return False


class Divergence:
    """Training health beyond NaN: a run whose weights or loss blow up while staying finite (lr
    far too high) is stopped before it writes a checkpoint, measured against its own history."""

    def __init__(self, params: list[nn.Parameter], weight_growth: float, loss_growth: float, out: Path):
        self.params, self.weight_growth, self.loss_growth, self.out = params, weight_growth, loss_growth, out
        self.start_rms = self.rms()
        self.losses: list[float] = []

    @torch.no_grad()
    def rms(self) -> float:
        """Root mean square of all trained weights: per-tensor norms computed in float64 (no
        overflow at 1e30; no float64 copy of the weights kept), summed."""
        count = sum(p.numel() for p in self.params)
        if not count:
            return 0.0
        norms = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in self.params])
        return math.sqrt(float(norms.square().sum()) / count)

    def check(self, step: int, loss: float | None = None) -> None:
        """Raise, naming what blew up, when the weights or `loss` (a logged mean) diverged."""
        rms = self.rms()
        limit = self.weight_growth * max(self.start_rms, 1e-6)
        if not rms <= limit:
            self.stop(step, f"the trained weights' RMS grew from {self.start_rms:.3g} to {rms:.3g} (limit "
                            f"train.max_weight_growth = {self.weight_growth:g}x)")
        if loss is None or not math.isfinite(loss):
            return
        if len(self.losses) >= 3:
            typical = sorted(self.losses)[len(self.losses) // 2]
            if typical > 0 and loss > self.loss_growth * typical:
                self.stop(step, f"the loss rose to {loss:.3g}, {loss / typical:.3g}x its median so far "
                                f"{typical:.3g} (limit train.max_loss_growth = {self.loss_growth:g}x)")
        self.losses.append(loss)

    def stop(self, step: int, what: str) -> None:
        raise LimnerError(f"training stopped at step {step}: the run diverged: {what}. No checkpoint was written "
                          f"after it: the ones in {self.out / 'checkpoints'} are untouched and `latest` loads. Usual "
                          "causes: train.lr too high or too little warm-up.")
