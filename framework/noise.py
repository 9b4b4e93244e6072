"""Noise levels of discrete-time diffusion training, expressed as Karras sigmas.

A DDPM-trained model (Ho et al. 2020) sees x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
dividing by sqrt(abar_t) gives the variance-exploding form x0 + sigma_t eps with
sigma_t = sqrt((1 - abar_t) / abar_t), which is how every limner sampler sees it.
"""
from __future__ import annotations

import math

import torch

from .errors import LimnerError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def ddpm_betas(kind: str = "linear", timesteps: int = 1000) -> torch.Tensor:
    """Betas of DDPM training, float64, on the CPU (also when a model is built on the meta device).

    linear: Ho et al. 2020, 1e-4 .. 0.02; scaled_linear: Stable Diffusion's, linear in
    sqrt(beta) from 0.00085 to 0.012; cosine: Nichol & Dhariwal 2021, s=0.008, beta <= 0.999.
    """
    if kind == "linear":
        return torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64, device="cpu")
    if kind == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2
    if kind == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps
        abar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise LimnerError(f"unknown beta schedule {kind!r}. Valid: {', '.join(BETA_SCHEDULES)}.")


def ddpm_sigmas(kind: str = "linear", timesteps: int = 1000) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1, ascending, float64."""
    abar = torch.cumprod(1 - ddpm_betas(kind, timesteps), dim=0)
    return ((1 - abar) / abar).sqrt()


class SigmaTable:
    """A model's ascending table of sigmas indexed by (fractional) timestep, as ComfyUI's
    model_sampling: sigma(t) interpolates log-sigma, timestep(sigma) inverts it."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.double()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def loglinear(cls, sigma_min: float, sigma_max: float, size: int = 1000) -> SigmaTable:
        """The table of a continuous-sigma (EDM) model: log-uniform between the bounds."""
        logs = torch.linspace(math.log(sigma_min), math.log(sigma_max), size, dtype=torch.float64, device="cpu")
        return cls(logs.exp())

    @classmethod
    def named(cls, table: str, sigma_min: float, sigma_max: float) -> SigmaTable:
        """'loglinear' or a DDPM beta schedule ('linear', 'scaled_linear', 'cosine')."""
        if table == "loglinear":
            return cls.loglinear(sigma_min, sigma_max)
        if table in BETA_SCHEDULES:
            return cls(ddpm_sigmas(table))
        raise LimnerError(f"unknown sigma table {table!r}. Valid: loglinear, {', '.join(BETA_SCHEDULES)}.")

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at fractional timesteps t, interpolating log-sigma linearly."""
        t = t.double().clamp(0, len(self) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma (inverse of `sigma`, clamped to the table)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self) - 1)
        lo = hi - 1
        w = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo.double() + w
