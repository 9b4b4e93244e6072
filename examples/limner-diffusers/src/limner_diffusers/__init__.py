"""limner-diffusers: a diffusers UNet2DConditionModel folder as a limner denoiser."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import limner
from limner.protocols import TextEmbedding
from limner.text_cache import weights_from_factory

PREDICTIONS = ("epsilon", "v_prediction")


def discrete_log_sigmas(scheduler_config: dict) -> torch.Tensor:
    """log sigma of each training timestep, ascending: sigma_t^2 = (1 - abar_t) / abar_t (Ho et
    al. 2020), abar from the scheduler config's beta schedule ("linear", "scaled_linear" as in
    Stable Diffusion, or explicit trained_betas)."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    start, end = float(scheduler_config.get("beta_start", 1e-4)), float(scheduler_config.get("beta_end", 0.02))
    kind = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        raise limner.LimnerError(f"diffusers_unet: beta_schedule {kind!r} is not supported; "
                                 "valid: linear, scaled_linear (or trained_betas)")
    abar = torch.cumprod(1 - betas, 0)
    return (0.5 * ((1 - abar) / abar).log()).float()


class DiffusersDenoiser(nn.Module):
    """D(x, sigma, cond) around a diffusers UNet: x / sqrt(sigma^2 + 1) in, the prediction
    turned into an x0 estimate (k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser)."""

    def __init__(self, unet: nn.Module, log_sigmas: torch.Tensor, prediction_type: str, round_timesteps: bool):
        super().__init__()
        self.unet, self.prediction_type, self.round_timesteps = unet, prediction_type, round_timesteps
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)
        self.requires_grad_(False).eval()
        weights_from_factory(self)

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional training timestep whose log sigma `sigma` interpolates (clamped to the table)."""
        log_sigmas = self.log_sigmas.double()
        log_sigma = sigma.double().clamp_min(1e-10).log()
        above = (log_sigma[None] - log_sigmas[:, None]) >= 0  # [T, B]
        low = above.cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        return t.round() if self.round_timesteps else t

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextEmbedding | None = None) -> torch.Tensor:
        if cond is None:
            raise limner.LimnerError("diffusers_unet needs a text embedding: its UNet cross-attends to one")
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s**2 + 1).sqrt()
        out = self.unet(x * c_in, self.timestep(sigma).to(x.dtype), encoder_hidden_states=cond.tokens.to(x.dtype),
                        encoder_attention_mask=cond.mask).sample
        if self.prediction_type == "epsilon":
            return x - s * out
        return x / (s**2 + 1) - out * s * c_in  # v: c_skip = 1 / (s^2 + 1), c_out = -s / sqrt(s^2 + 1)

    def loss(self, *args, **kwargs):
        raise limner.LimnerError("diffusers_unet wraps a pretrained diffusers model for sampling; it does not train")


def diffusers_unet(path: str, context_dim: int | None = None, in_channels: int | None = None,
                   image_size: int | None = None, prediction_type: str | None = None,
                   round_timesteps: bool = False) -> DiffusersDenoiser:
    """A diffusers UNet2DConditionModel folder (a pipeline folder with unet/ and scheduler/, or
    the unet folder with a scheduler_config.json beside its config) as D(x, sigma, cond)."""
    from diffusers import UNet2DConditionModel

    root = Path(path)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    candidates = [root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"]
    sched_file = next((p for p in candidates if p.is_file()), None)
    if not (unet_dir / "config.json").is_file() or sched_file is None:
        raise limner.LimnerError(f"diffusers_unet: {root} holds no diffusers UNet with a scheduler config "
                                 f"(looked for {unet_dir / 'config.json'} and {' or '.join(map(str, candidates))})")
    sched = json.loads(sched_file.read_text())
    prediction = prediction_type or sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise limner.LimnerError(f"diffusers_unet: prediction_type {prediction!r} is not supported; "
                                 f"valid: {', '.join(PREDICTIONS)}")
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    checks = {
        "context_dim": (context_dim, unet.config.cross_attention_dim),
        "in_channels": (in_channels, unet.config.in_channels),
        "image_size": (image_size, unet.config.sample_size),
    }
    for name, (given, own) in checks.items():
        if given is not None and given != own:
            raise limner.LimnerError(f"diffusers_unet: the model's {name} is {own}, the config asks for {given}")
    return DiffusersDenoiser(unet, discrete_log_sigmas(sched), prediction, round_timesteps)


@limner.hookimpl
def limner_register_denoisers():
    """A diffusers UNet2DConditionModel folder as a denoiser."""
    return [limner.ComponentSpec("diffusers_unet", diffusers_unet)]
