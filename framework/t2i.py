"""The text-to-image diffusion model: a text encoder and a denoiser, built from config."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ComponentConfig, bounded, component
from .protocols import TextEmbedding
from .text_cache import EmbeddingCache, with_phrase_tokens


@dataclass
class ModelConfig:
    """Which text encoder and denoiser, by name with their options (no defaults: the framework
    names no component; the shipped configs do)."""

    text_encoder: ComponentConfig = component("text_encoders")
    denoiser: ComponentConfig = component("denoisers")
    image_size: int = bounded(32, ge=1, le=4096)
    channels: int = bounded(3, ge=1, le=64)
    phrase_tokens: bool = False  # encode the prompt clause by clause (text_cache.with_phrase_tokens)


@dataclass
class SampleConfig:
    """How images are drawn: in training's sample grids, `limner sample` and the demo."""

    sampler: ComponentConfig = component("samplers")
    schedule: ComponentConfig = component("schedules")
    steps: int = bounded(20, ge=1, le=10_000)
    guidance: float = bounded(3.0, ge=0)
    # float32 bounds: the denoiser embeds log(sigma) and scales by 1/sqrt(sigma^2 + sigma_data^2)
    sigma_min: float = bounded(0.002, ge=1e-6)
    sigma_max: float = bounded(80.0, gt=0, le=1e5)
    prompts: list[str] = field(default_factory=list)
    compile: bool = False  # torch.compile the denoiser for sampling: pays ~30 s once per batch size
    channels_last: bool = True  # NHWC activations: oneDNN's (and tensor cores') fast layout; same math


class TextToImage(nn.Module):
    """encode(prompts) -> TextEmbedding; forward(x, sigma, cond) -> x0 estimate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = cfg.text_encoder.build()
        self.denoiser = cfg.denoiser.build(context_dim=self.text_encoder.dim, in_channels=cfg.channels,
                                           image_size=cfg.image_size)
        self.text_cache = EmbeddingCache()

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """The prompts' embedding; a frozen encoder's come from the cache when seen before."""
        if self.cfg.phrase_tokens:
            return with_phrase_tokens(lambda ps: self.text_cache.encode(self.text_encoder, ps), prompts)
        return self.text_cache.encode(self.text_encoder, prompts)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextEmbedding | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, cond)

    def training_loss(self, images: torch.Tensor, captions: list[str], sigma: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """Mean denoising loss of a batch; text encoding inside, so DDP sees one forward."""
        return self.denoiser.loss(images, self.encode(captions), sigma, noise).mean()
