"""The `gan` and `vae` recipes: one-step generators from text, in one module - the run config's
schema, the sampling model (text encoder + generator) and its pipeline, and the trainer's step.

    limner train configs/gan-shapes.toml                # recipe = "gan" (or "vae")
    pipe = limner.load_pipeline("runs/gan-shapes")
    images = pipe(["a red circle at the top left"], truncation=0.7, seed=0)

GAN: per step one discriminator update (adversarial loss + penalties, each lazily every
`interval` steps and scaled by it, as in StyleGAN2) then one generator update; EMA of the
generator; the truncation trick at sampling. VAE: one ELBO step. Both resume exactly: each
step's randomness comes from seeds of (seed, step, rank), as in diffusion training; the loop,
logs, grids, checkpoints and resume are limner.train.TrainerBase's.

Several processes: gradients are averaged by hand after each backward (as StyleGAN2-ADA
does) instead of through DDP, because R1's double backward does not go through DDP hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from limner.config import ComponentConfig, bounded, component, components
from limner.ema import EMA
from limner.errors import LimnerError
from limner.pipeline import PipelineBase
from limner.protocols import AdversarialLoss, Penalty, TextEmbedding
from limner.recipes import Recipe
from limner.text_cache import EmbeddingCache
from limner.train import DataConfig, LoopConfig, RunConfig, TrainerBase, step_generator


@dataclass
class GenDataConfig(DataConfig):
    batch_size: int = bounded(32, ge=1)


@dataclass
class GenModelConfig:
    """Text encoder, generator and (for the GAN recipe) discriminator, by name."""

    text_encoder: ComponentConfig = component("text_encoders")
    generator: ComponentConfig = component("generators")
    discriminator: ComponentConfig | None = field(default=None, metadata={"kind": "discriminators"})  # GAN only
    image_size: int = bounded(32, ge=1)
    channels: int = bounded(3, ge=1)
    train_text_encoder: bool = True  # GAN: trained by D's loss (G reads it); VAE: by the ELBO


@dataclass(kw_only=True)
class GenOptimConfig(LoopConfig):
    """[train] of the gan and vae recipes (the loop's own settings come from LoopConfig)."""

    loss: ComponentConfig = component("losses")  # the objective: a GAN loss (hinge, ...), or the VAE's (elbo)
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


@dataclass
class GenSampleConfig:
    """How training's sample grids, `limner sample` and the demo draw by default."""

    truncation: float = bounded(1.0, ge=0)
    prompts: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class GenTrainConfig(RunConfig):
    """A GAN or VAE run (recipe = "gan" | "vae")."""

    data: GenDataConfig = field(default_factory=GenDataConfig)
    model: GenModelConfig = field(default_factory=GenModelConfig)
    train: GenOptimConfig = field(default_factory=GenOptimConfig)
    sample: GenSampleConfig = field(default_factory=GenSampleConfig)

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


class GeneratorPipeline(PipelineBase):
    """A GAN or VAE checkpoint as a callable: one generator pass per image."""

    @property
    def features(self) -> frozenset[str]:
        """truncation always; reconstruct where the generator has an encoder (a VAE)."""
        vae = all(hasattr(self.model.generator, m) for m in ("encode", "decode"))
        return frozenset({"truncation", "reconstruct"} if vae else {"truncation"})

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | str,
        *,
        seed: int | list[int] = 0,
        num: int = 1,
        truncation: float | None = None,
        progress: bool = False,
        **diffusion_only,
    ) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1]; truncation < 1 trades variety for typical images."""
        self.refuse(diffusion_only, f"a {type(self.model.generator).__name__} draws in one step and takes seed, "
                                    "num and truncation (sampler, schedule, steps, guidance and the rest are for "
                                    "diffusion checkpoints)")
        prompts = self.expand(prompts, num)
        truncation = self.check(truncation=truncation)
        z, gen = self.noise(self.model.generator.z_shape, seed, len(prompts), num)  # same prompt + seed, same image
        return self.model(z, self.model.encode(prompts), truncation=truncation, generator=gen).clamp(-1, 1)

    def check(self, truncation: float | None = None) -> float:
        """The truncation to use (given, or the checkpoint's), checked to be in [0, 1]."""
        truncation = self.defaults.truncation if truncation is None else truncation
        if not 0 <= truncation <= 1:
            raise LimnerError(f"truncation must be in [0, 1], got {truncation}")
        return truncation

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """A VAE's reconstructions [N, C, H, W] in [-1, 1]: decode(posterior mean of encode(image,
        prompt), prompt). A generator with no encoder (a GAN) cannot reconstruct: an error says so."""
        if "reconstruct" not in self.features:
            raise LimnerError(f"a {type(self.model.generator).__name__} has no encoder: only a VAE checkpoint "
                              "reconstructs images (--reconstruct)")
        if len(images) != len(prompts):
            raise LimnerError(f"reconstruct: {len(images)} images but {len(prompts)} prompts")
        cond = self.model.encode(list(prompts))
        mean, _ = self.model.generator.encode(images.to(self.device), cond)
        return self.model.generator.decode(mean, cond).clamp(-1, 1)


# --- training -------------------------------------------------------------------------

class GenTrainer(TrainerBase):
    """What the GAN and VAE trainers share: the generator model and its EMA, the loss, the
    optimisers, the step seeds and the guarded update. A subclass builds its extra modules,
    checks its loss and writes one step (`generator_step`)."""

    def __init__(self, cfg: GenTrainConfig):
        self.setup(cfg)
        self.model = GeneratorModel(cfg.model).to(self.acc.device)
        self.build()
        self.ema = EMA(self.model, cfg.train.ema)
        self.loss = cfg.train.loss.build()
        self.check_loss()
        if not cfg.model.train_text_encoder:
            self.model.text_encoder.requires_grad_(False)
        text = list(self.model.text_encoder.parameters()) if cfg.model.train_text_encoder else []
        self.opts = self.optimizers(text, tuple(cfg.train.betas))
        self.setup_data(cfg.model.channels, cfg.model.image_size)

    def build(self) -> None:
        """Modules beyond the generator model (a GAN's discriminator)."""

    def check_loss(self) -> None:
        raise NotImplementedError

    def optimizers(self, text: list[torch.nn.Parameter], betas: tuple) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def generator_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        raise NotImplementedError

    def refuse_loss(self, want: str) -> None:
        raise LimnerError(f"train.loss {self.cfg.train.loss.name!r} does not fit recipe {self.cfg.recipe!r}: it needs "
                          f"{want}")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "ema": self.ema.model}

    # --- one step --------------------------------------------------------------------

    def _seed_step(self) -> torch.Generator:
        return step_generator(self.cfg.seed, self.step, self.acc.process_index)

    def _latent(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.model.generator.z_shape), generator=gen).to(self.acc.device)

    def _update(self, name: str, loss: torch.Tensor) -> bool:
        """Backward and one guarded step of optimiser `name`: False when the guard skipped it."""
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if self.acc.num_processes > 1:  # average gradients over ranks (see the module docstring)
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.acc.num_processes
        return self.guarded_step(opt, params, float(loss.detach()), self.cfg.train.grad_clip)

    # --- in the shared loop (TrainerBase.fit) ----------------------------------------------

    def before_fit(self) -> None:
        self.model.train()

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        """A GAN's or VAE's step, then the EMA; a step the non-finite guard skipped is neither
        averaged into the EMA nor logged (None), as in the diffusion recipe."""
        row = self.generator_step(images.to(self.acc.device), captions)
        if row is not None:
            self.ema.update(self.model, self.step)
        return row

    def pipeline(self) -> GeneratorPipeline:
        """The EMA generator as a pipeline with the run's sampling defaults."""
        return GeneratorPipeline(self.ema.model, self.cfg.sample, self.acc.device)


class GANTrainer(GenTrainer):
    """A text-conditional GAN: a discriminator update, then a generator update, per step."""

    def build(self) -> None:
        m = self.cfg.model
        if m.discriminator is None:
            raise LimnerError("recipe 'gan' needs model.discriminator: name one (see `limner plugins`, "
                              "discriminators), e.g. discriminator = { name = \"projection\", width = 32 }")
        self.disc = m.discriminator.build(context_dim=self.model.text_encoder.dim, channels=m.channels,
                                          image_size=m.image_size).to(self.acc.device)

    def check_loss(self) -> None:
        t = self.cfg.train
        if not isinstance(self.loss, AdversarialLoss):
            self.refuse_loss("an adversarial loss (nonsaturating, hinge, wgan)")
        self.penalties = [p.build() for p in t.penalties]
        for p_cfg, penalty in zip(t.penalties, self.penalties):
            if not isinstance(penalty, Penalty):
                raise LimnerError(f"train.penalties: {p_cfg.name!r} is not a discriminator penalty "
                                  "(r1, wgan_gp, matching_aware)")

    def optimizers(self, text, betas):
        t = self.cfg.train
        return {"g": torch.optim.Adam(self.model.generator.parameters(), lr=t.lr, betas=betas),
                "d": torch.optim.Adam([*self.disc.parameters(), *text], lr=t.d_lr, betas=betas)}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), "discriminator": self.disc}

    def generator_step(self, real: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        """D's update, then G's; None (the step skipped, G untouched) when the guard skipped D's."""
        gen, n = self._seed_step(), real.shape[0]
        cond = self.model.encode(captions)  # trained through D's loss when train_text_encoder
        with torch.no_grad():
            fake = self.model.generator(self._latent(n, gen), _detach(cond))
        logits_real, logits_fake = self.disc(real, cond), self.disc(fake, cond)
        d_loss = self.loss.d_real(logits_real) + self.loss.d_fake(logits_fake)
        row = {"d_real": float(logits_real.detach().mean()), "d_fake": float(logits_fake.detach().mean())}
        for cfg, penalty in zip(self.cfg.train.penalties, self.penalties):
            if self.step % penalty.interval == 0:
                term = penalty(self.disc, real, fake, cond, self.loss)
                d_loss = d_loss + term * penalty.interval
                row[cfg.name] = float(term.detach())
        if not self._update("d", d_loss):
            return None
        self.disc.requires_grad_(False)
        fake = self.model.generator(self._latent(n, gen), _detach(cond))
        g_loss = self.loss.g(self.disc(fake, _detach(cond)))
        if self.cfg.train.reconstruction > 0:  # squared error: L1's median is the background here
            mse = (fake - real).square().mean()
            g_loss = g_loss + self.cfg.train.reconstruction * mse
            row["mse"] = float(mse.detach())
        updated = self._update("g", g_loss)
        self.disc.requires_grad_(True)
        if not updated:
            return None
        return {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()), **row}


class VAETrainer(GenTrainer):
    """A conditional VAE trained on its ELBO."""

    def check_loss(self) -> None:
        if isinstance(self.loss, AdversarialLoss):
            self.refuse_loss("a VAE loss (elbo)")
        if self.cfg.train.reconstruction:
            raise LimnerError(f"train.reconstruction must be >= 0 and is for recipe 'gan' only (the VAE's ELBO "
                              f"has its own reconstruction term), got {self.cfg.train.reconstruction} for 'vae'")
        if not all(hasattr(self.model.generator, a) for a in ("encode", "decode")):
            raise LimnerError(f"recipe 'vae' needs a generator with encode/decode (e.g. 'vae'), "
                              f"got {self.cfg.model.generator.name!r}")

    def optimizers(self, text, betas):
        t = self.cfg.train
        return {"vae": torch.optim.Adam([*self.model.generator.parameters(), *text], lr=t.lr, betas=betas)}

    def generator_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        """One ELBO step (Kingma & Welling 2014) with the reparameterised sample of this step's seed."""
        gen = self._seed_step()
        vae, cond = self.model.generator, self.model.encode(captions)
        mean, logvar = vae.encode(images, cond)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen).to(mean)
        loss, parts = self.loss(images, vae.decode(z, cond), mean, logvar, self.step)
        if not self._update("vae", loss):
            return None
        return {"loss": float(loss.detach()), **parts}


def _detach(cond):
    """The prompt embedding without its graph: G's loss must not train D's text encoder."""
    return None if cond is None else cond.detach()


def gan() -> Recipe:
    """A text-conditional GAN: generator and discriminator updates per step, EMA generator."""
    return Recipe(config=GenTrainConfig, trainer=GANTrainer, model=lambda cfg: GeneratorModel(cfg.model),
                  pipeline=GeneratorPipeline)


def vae() -> Recipe:
    """A conditional VAE trained on its ELBO."""
    return Recipe(config=GenTrainConfig, trainer=VAETrainer, model=lambda cfg: GeneratorModel(cfg.model),
                  pipeline=GeneratorPipeline)
