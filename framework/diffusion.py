"""Denoiser parameterisations and the training loss, in the Karras/EDM convention.

A network F(c_in x, c_noise, cond) becomes D(x, sigma, cond) = c_skip x + c_out F once,
here, for every parameterisation (Karras et al. 2022, Table 1):
  edm  c_skip = sd^2/(s^2+sd^2)  c_out = s sd / sqrt(s^2+sd^2)    (F predicts a mix)
  v    as edm with c_out negated: F predicts v (Salimans & Ho 2022)
  eps  c_skip = 1                c_out = -s                      (F predicts the noise)
  x0   c_skip = 0                c_out = 1                       (F predicts the image)
with c_in = 1/sqrt(s^2+sd^2) and c_noise = log(s)/4, and
  flow c_skip = c_in = 1/(1+s)  c_out = -s/(1+s)  c_noise = t      (F predicts the velocity)
for rectified flow (Liu et al. 2023; Lipman et al. 2023): x_t = (1-t) x0 + t eps is x/(1+s) at
t = s/(1+s), and F predicts v = eps - x0, so D = x_t - t F. Its logit-normal training times
t = sigmoid(n), n ~ N(m, s^2) (Esser et al. 2024) are exactly log-normal sigmas, sigma = e^n:
p_mean = m, p_std = s in [train]. Euler's step is the same in either view (x' = (s'/s) x +
(1 - s'/s) D is x_t' = x_t + (t' - t) v), so every sampler drives a flow model through sigmas.
Training weights the x0 error by 1/c_out^2, which is exactly the plain MSE of F against its
own target.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import LimnerError
from .protocols import WithImage

PARAMETERIZATIONS = ("edm", "v", "eps", "x0", "flow")


def preconditioning(sigma: torch.Tensor, kind: str, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise), each shaped like sigma."""
    total = sigma**2 + sigma_data**2
    c_in, c_noise = total.rsqrt(), sigma.log() / 4
    if kind in ("edm", "v"):
        c_skip, c_out = sigma_data**2 / total, sigma * sigma_data * total.rsqrt()
        return c_skip, (-c_out if kind == "v" else c_out), c_in, c_noise
    if kind == "eps":
        return torch.ones_like(sigma), -sigma, c_in, c_noise
    if kind == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, c_noise
    if kind == "flow":
        inv = 1 / (1 + sigma)
        return inv, -sigma * inv, inv, sigma * inv
    raise LimnerError(f"unknown parameterization {kind!r}. Valid: {', '.join(PARAMETERIZATIONS)}.")


class Preconditioned(nn.Module):
    """D(x, sigma, cond) around a network net(x_in, c_noise, cond) -> [B, C, H, W]. With
    `concat` channels the network also reads an image beside x: cond is then a WithImage whose
    `image` (that many channels) joins the scaled input, unscaled, as Stable Diffusion's
    inpainting UNets take their mask and masked image."""

    def __init__(self, net: nn.Module, parameterization: str = "edm", sigma_data: float = 0.5, concat: int = 0):
        super().__init__()
        if isinstance(concat, bool) or not isinstance(concat, int) or concat < 0:
            raise LimnerError(f"concat (image channels read beside the input) must be a whole number >= 0, got "
                              f"{concat!r}")
        self.concat = concat
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not 0 < sigma_data <= 1e3:
            raise LimnerError(f"sigma_data (the data's standard deviation) must be a number in (0, 1000], got "
                              f"{sigma_data!r}")
        preconditioning(torch.ones(1, device="cpu"), parameterization, sigma_data)  # validate the name early
        self.net, self.parameterization, self.sigma_data = net, parameterization, sigma_data

    @property
    def reads_pooled(self) -> bool:
        """Whether the network reads the text's pooled vector (the Denoiser protocol's attribute)."""
        return getattr(self.net, "reads_pooled", True)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in
                                        preconditioning(sigma, self.parameterization, self.sigma_data))
        x_in = (c_in * x).to(x.dtype)
        if self.concat:
            if not isinstance(cond, WithImage) or cond.image.shape[1] != self.concat or \
                    cond.image.shape[0] != x.shape[0] or cond.image.shape[2:] != x.shape[2:]:
                got = f"a {type(cond).__name__}" if not isinstance(cond, WithImage) else \
                    f"an image of shape {tuple(cond.image.shape)}"
                raise LimnerError(f"this denoiser reads {self.concat} image channels beside its "
                                  f"{tuple(x.shape)} input (an inpainting model: mask and masked image), got {got}")
            x_in, cond = torch.cat([x_in, cond.image.to(x_in.dtype)], 1), cond.cond
        out = self.net(x_in, c_noise.flatten(), cond)
        return (c_skip * x + c_out * out.float()).to(x.dtype)

    def loss(self, x0: torch.Tensor, cond: Any, sigma: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss: 1/c_out^2 weighted squared error of D at x0 + sigma * noise."""
        denoised = self(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)
        _, c_out, _, _ = preconditioning(sigma.float(), self.parameterization, self.sigma_data)
        return ((denoised.float() - x0.float()) ** 2).flatten(1).mean(1) / c_out**2


def training_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Log-normal noise levels ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, sec. 5)."""
    return (torch.randn(n, generator=generator, device=device) * p_std + p_mean).exp()
