"""The `autoencoder` recipe: latent diffusion's first stage (Rombach et al. 2022), a KL
autoencoder trained on a dataset's images. A diffusion config then names the folder it writes,
`[model] autoencoder = { name = "autoencoder_kl", path = "RUN/autoencoder" }`, and its denoiser
learns on those latents: the second stage.

The loss is the mean absolute reconstruction error plus `kl` times the posterior's KL divergence
to N(0, I), per latent element (LDM's perceptual and adversarial terms are left out: they are for
photographs' texture). At the end the autoencoder's `shift` and `scale` become the mean and 1/std
of the training images' latents (LDM chose SD's 0.18215 so), so the denoiser sees unit variance.

    limner train configs/latent/shapes-autoencoder.toml
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.checkpoint import write_weights
from limner.config import ComponentConfig, bounded, component
from limner.evaluation import held_out_items
from limner.files import write_text_atomic
from limner.recipes import Recipe
from limner.train import DataConfig, LossTrainer, RunConfig, WarmupCosineConfig


@dataclass
class AutoencoderModelConfig:
    """[model]: the autoencoder component and its options; channels and image_size are read from
    the training data when left out (the run's config.toml records them)."""

    autoencoder: ComponentConfig = component("autoencoders", "autoencoder_kl")
    channels: int = bounded(0, ge=0)
    image_size: int = bounded(0, ge=0)


@dataclass(kw_only=True)
class AutoencoderOptimConfig(WarmupCosineConfig):
    """[train]: the loop's settings, AdamW with a warm-up and a cosine decay, and the KL weight."""

    lr: float = bounded(5e-4, gt=0)
    grad_clip: float = bounded(1.0, ge=0)
    kl: float = bounded(1e-4, ge=0)  # per latent element, against the per-pixel L1 error
    stats_items: int = bounded(1024, ge=1)  # training images whose latents set shift and scale


@dataclass(kw_only=True)
class AutoencoderRunConfig(RunConfig):
    """An autoencoder run (recipe = "autoencoder"); [eval] dataset is the held-out set its
    reconstructions are scored on ([eval] prompts: how many of its items, 0 = all)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    train: AutoencoderOptimConfig = field(default_factory=AutoencoderOptimConfig)


class KLLoss(nn.Module):
    """loss(images, captions) of an autoencoder with moments() and decoder: L1 + kl * KL (the
    captions are not read); the posterior is sampled from the global RNG, which the loop seeds
    per step."""

    def __init__(self, autoencoder: nn.Module, kl: float):
        super().__init__()
        self.autoencoder, self.kl = autoencoder, kl

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions of `images` from posterior samples (no scale or shift: training)."""
        mean, logvar = self.autoencoder.moments(images)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.autoencoder.decoder(self.autoencoder.post_quant_conv(z)), mean, logvar

    def loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out, mean, logvar = self(images)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        return F.l1_loss(out, images) + self.kl * kl


def build(cfg: AutoencoderModelConfig) -> nn.Module:
    """The autoencoder, trainable, of the run's image shape."""
    ae = cfg.autoencoder.build(in_channels=cfg.channels, freeze=False)
    ae.latent_shape(cfg.channels, cfg.image_size)  # the image size must suit its factor: named now
    return ae


class AutoencoderTrainer(LossTrainer):
    """L1 + KL on the dataset's images; at the end the autoencoder folder, its latent statistics
    and its held-out reconstruction PSNR."""

    def __init__(self, cfg: AutoencoderRunConfig):
        self.setup(cfg)
        m = cfg.model
        if not m.channels or not m.image_size:
            channels, size = self.data_shape()
            m.channels, m.image_size = m.channels or channels, m.image_size or size
        self.use_model(KLLoss(build(m), cfg.train.kl))

    @torch.no_grad()
    def statistics(self) -> tuple[float, float]:
        """(shift, scale): the mean and 1/std of the posterior means of the first stats_items
        training images, which become the latents the denoiser is trained on."""
        n = min(self.cfg.train.stats_items, len(self.dataset))
        ae = self.model.autoencoder.eval()
        means = [ae.moments(torch.stack([self.dataset[i][0] for i in range(s, min(s + 64, n))]))[0]
                 for s in range(0, n, 64)]
        z = torch.cat(means).double()
        return float(z.mean()), float(1 / z.std().clamp_min(1e-6))

    def finish(self) -> dict:
        """out/autoencoder (autoencoder.json + weights), read back and scored as saved."""
        shift, scale = self.statistics()
        spec = self.cfg.model.autoencoder
        folder = self.out / "autoencoder"
        meta = {"autoencoder": spec.name, "options": {**spec.options, "in_channels": self.cfg.model.channels,
                                                      "shift": shift, "scale": scale},
                "image_size": self.cfg.model.image_size, "step": self.step}
        write_weights(folder / "model.safetensors", self.model.autoencoder.state_dict())
        write_text_atomic(folder / "autoencoder.json", json.dumps(meta, indent=1) + "\n")
        images, _ = held_out_items(self.cfg.eval)
        saved = limner.create("autoencoders", spec.name, path=str(folder))
        meta["scores"] = {**reconstruction(saved, images), "held_out": len(images),
                          "steps": self.step, "cpu_minutes": round(self.train_seconds() / 60, 2)}
        write_text_atomic(folder / "autoencoder.json", json.dumps(meta, indent=1) + "\n")
        return meta["scores"]


@torch.no_grad()
def reconstruction(ae: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, pixel range [0, 1]) of decode(encode(images)), and of the latents' spread (their
    std once scaled: 1 when shift and scale fit the data)."""
    latents = torch.cat([ae.encode(images[i:i + 64]) for i in range(0, len(images), 64)])
    out = torch.cat([ae.decode(latents[i:i + 64]) for i in range(0, len(latents), 64)]).clamp(-1, 1)
    mse = float(((out - images) / 2).pow(2).mean())
    return {"psnr": round(-10 * torch.log10(torch.tensor(mse)).item(), 2), "latent_std": round(float(latents.std()), 3),
            "latent_shape": list(latents.shape[1:])}


def autoencoder_recipe() -> Recipe:
    """Train latent diffusion's autoencoder; a diffusion config reads it with `path = "RUN/autoencoder"`."""
    return Recipe(config=AutoencoderRunConfig, trainer=AutoencoderTrainer, model=lambda cfg: KLLoss(
        build(cfg.model), cfg.train.kl), pipeline=None, outputs=frozenset({"autoencoder"}))
