"""One-step generators from text: GANs and VAEs. Configs, the sampling model (text encoder +
generator) and its pipeline; training lives in gan_train.py.

    pipe = limner.load_pipeline("runs/gan-shapes")      # a GAN or VAE run
    images = pipe(["a red circle at the top left"], truncation=0.7, seed=0)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from .config import ComponentConfig, bounded, component, components
from .errors import LimnerError
from .images import to_pil
from .protocols import TextEmbedding
from .sampling import item_generators, randn_like
from .text_cache import EmbeddingCache
from .train import EvalConfig


@dataclass
class GenDataConfig:
    dataset: ComponentConfig = component("datasets")
    batch_size: int = bounded(32, ge=1)
    workers: int = bounded(0, ge=0)


@dataclass
class GenModelConfig:
    """Text encoder, generator and (for the GAN recipe) discriminator, by name."""

    text_encoder: ComponentConfig = component("text_encoders")
    generator: ComponentConfig = component("generators")
    discriminator: ComponentConfig | None = field(default=None, metadata={"kind": "discriminators"})  # GAN only
    image_size: int = bounded(32, ge=1)
    channels: int = bounded(3, ge=1)
    train_text_encoder: bool = True  # GAN: trained by D's loss (G reads it); VAE: by the ELBO


@dataclass
class GenOptimConfig:
    loss: ComponentConfig = component("losses")  # the objective: a GAN loss (hinge, ...), or the VAE's (elbo)
    steps: int = bounded(10_000, ge=1)
    lr: float = bounded(2e-3, gt=0)  # generator (VAE: the whole model)
    d_lr: float = bounded(2e-3, gt=0)
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    ema: float = bounded(0.999, ge=0, lt=1)
    grad_clip: float = bounded(0.0, ge=0)
    penalties: list[ComponentConfig] = components("losses")  # GAN recipe only
    # GAN: weight of a squared-error term between G(z, prompt) and the batch's real image of that
    # prompt, beside the adversarial loss (Pathak et al. 2016; pix2pix's L1, Isola et al. 2017):
    # right where a prompt pins its image down; 0 = a pure GAN
    reconstruction: float = bounded(0.0, ge=0)
    nonfinite: str = "skip"  # as [train] of a diffusion run: "skip" an update with NaN/inf loss or gradients, or "stop"
    max_nonfinite: int = bounded(10, ge=1)
    log_every: int = bounded(25, ge=1)
    sample_every: int = bounded(1000, ge=1)
    checkpoint_every: int = bounded(1000, ge=1)


@dataclass
class GenSampleConfig:
    """How training's sample grids, `limner sample` and the demo draw by default."""

    truncation: float = bounded(1.0, ge=0)
    prompts: list[str] = field(default_factory=list)


@dataclass
class GenTrainConfig:
    out: str
    recipe: str  # "gan" or "vae"
    seed: int = 0
    data: GenDataConfig = field(default_factory=GenDataConfig)
    model: GenModelConfig = field(default_factory=GenModelConfig)
    train: GenOptimConfig = field(default_factory=GenOptimConfig)
    sample: GenSampleConfig = field(default_factory=GenSampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.recipe not in ("gan", "vae"):
            raise LimnerError(f"recipe {self.recipe!r} is not a generator recipe; valid: gan, vae")


class GeneratorModel(nn.Module):
    """Text encoder + generator: everything sampling needs (and what the EMA tracks)."""

    def __init__(self, cfg: GenModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = cfg.text_encoder.build()
        self.generator = cfg.generator.build(context_dim=self.text_encoder.dim, channels=cfg.channels,
                                             image_size=cfg.image_size)
        if not isinstance(getattr(self.generator, "z_shape", None), tuple):
            raise LimnerError(f"generator {cfg.generator.name!r} has no z_shape tuple: limner cannot draw its "
                              "latent (a generator sets self.z_shape, e.g. (64,) or (4, 8, 8))")
        self.text_cache = EmbeddingCache()

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """The prompts' embedding; a frozen encoder's come from the cache when seen before."""
        return self.text_cache.encode(self.text_encoder, prompts)

    def forward(self, z: torch.Tensor, cond: TextEmbedding | None, truncation: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.generator(z, cond, truncation=truncation, generator=generator)


class GeneratorPipeline:
    """A GAN or VAE checkpoint as a callable: one generator pass per image."""

    def __init__(self, model: GeneratorModel, defaults: GenSampleConfig, device: torch.device):
        self.model, self.defaults, self.device = model.eval().to(device), defaults, device

    def __call__(self, prompts: list[str] | str, **options) -> list[Image.Image]:
        """Images for `prompts`: see `generate` for the options. Same arguments, same images."""
        return to_pil(self.generate(prompts, **options))

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, *, seed: int | list[int] = 0, num: int = 1, truncation: float | None = None,
                 progress: bool = False, **diffusion_only) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1]; truncation < 1 trades variety for typical images."""
        given = sorted(k for k, v in diffusion_only.items() if v is not None)
        if given:
            raise LimnerError(f"a {type(self.model.generator).__name__} draws in one step: {', '.join(given)} "
                              "apply to diffusion checkpoints only (this one takes seed, num, truncation)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = [p for p in prompts for _ in range(num)]
        truncation = self.defaults.truncation if truncation is None else truncation
        if not 0 <= truncation <= 1:
            raise LimnerError(f"truncation must be in [0, 1], got {truncation}")
        gen = item_generators(seed, len(prompts), num, self.device)  # same prompt + seed, same image, any batch
        z = randn_like(torch.empty((len(prompts), *self.model.generator.z_shape), device=self.device), gen)
        return self.model(z, self.model.encode(prompts), truncation=truncation, generator=gen).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """A VAE's reconstructions [N, C, H, W] in [-1, 1]: decode(posterior mean of encode(image,
        prompt), prompt). A generator with no encoder (a GAN) cannot reconstruct: an error says so."""
        encoder = getattr(self.model.generator, "encode", None)
        if encoder is None or not hasattr(self.model.generator, "decode"):
            raise LimnerError(f"a {type(self.model.generator).__name__} has no encoder: only a VAE checkpoint "
                              "reconstructs images (--reconstruct)")
        if len(images) != len(prompts):
            raise LimnerError(f"reconstruct: {len(images)} images but {len(prompts)} prompts")
        cond = self.model.encode(list(prompts))
        mean, _ = encoder(images.to(self.device), cond)
        return self.model.generator.decode(mean, cond).clamp(-1, 1)
