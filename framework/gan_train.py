"""Training GANs and VAEs with `limner train` (recipe = "gan" | "vae").

GAN: per step one discriminator update (adversarial loss + penalties, each lazily every
`interval` steps and scaled by it, as in StyleGAN2) then one generator update; EMA of the
generator; the truncation trick at sampling. VAE: one ELBO step. Both resume exactly: each
step's randomness comes from seeds of (seed, step, rank), as in diffusion training.

Several processes: gradients are averaged by hand after each backward (as StyleGAN2-ADA
does) instead of through DDP, because R1's double backward does not go through DDP hooks.
"""
from __future__ import annotations

import torch

from .errors import LimnerError
from .gan import GeneratorModel, GeneratorPipeline, GenTrainConfig
from .protocols import AdversarialLoss, Penalty
from .train import EMA, TrainerBase, step_generator


class GenTrainer(TrainerBase):
    """Owns the accelerator, models, EMA, optimisers and data of one GAN or VAE run."""

    def __init__(self, cfg: GenTrainConfig):
        self.setup(cfg)
        self.model = GeneratorModel(cfg.model).to(self.acc.device)
        self.gan = cfg.recipe == "gan"
        self.disc = self._discriminator().to(self.acc.device) if self.gan else None
        self.ema = EMA(self.model, cfg.train.ema)
        self._losses()
        self.opts = self._optimizers()
        self.setup_data(cfg.model.channels, cfg.model.image_size)

    def _discriminator(self):
        m = self.cfg.model
        if m.discriminator is None:
            raise LimnerError("recipe 'gan' needs model.discriminator: name one (see `limner plugins`, "
                              "discriminators), e.g. discriminator = { name = \"projection\", width = 32 }")
        return m.discriminator.build(context_dim=self.model.text_encoder.dim, channels=m.channels,
                                     image_size=m.image_size)

    def _losses(self) -> None:
        t = self.cfg.train
        loss_cfg = t.loss
        self.loss = loss_cfg.build()
        if self.gan != isinstance(self.loss, AdversarialLoss):
            want = "an adversarial loss (nonsaturating, hinge, wgan)" if self.gan else "a VAE loss (elbo)"
            raise LimnerError(f"train.loss {loss_cfg.name!r} does not fit recipe {self.cfg.recipe!r}: it needs {want}")
        self.penalties = [p.build() for p in t.penalties] if self.gan else []
        if t.reconstruction < 0 or (t.reconstruction and not self.gan):
            raise LimnerError(f"train.reconstruction must be >= 0 and is for recipe 'gan' only (the VAE's ELBO "
                              f"has its own reconstruction term), got {t.reconstruction} for {self.cfg.recipe!r}")
        for p_cfg, penalty in zip(t.penalties, self.penalties):
            if not isinstance(penalty, Penalty):
                raise LimnerError(f"train.penalties: {p_cfg.name!r} is not a discriminator penalty "
                                  "(r1, wgan_gp, matching_aware)")
        if not self.gan and not all(hasattr(self.model.generator, a) for a in ("encode", "decode")):
            raise LimnerError(f"recipe 'vae' needs a generator with encode/decode (e.g. 'vae'), "
                              f"got {self.cfg.model.generator.name!r}")

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        t, m = self.cfg.train, self.cfg.model
        text = list(self.model.text_encoder.parameters()) if m.train_text_encoder else []
        if not m.train_text_encoder:
            self.model.text_encoder.requires_grad_(False)
        betas = tuple(t.betas)
        if not self.gan:
            return {"vae": torch.optim.Adam([*self.model.generator.parameters(), *text], lr=t.lr, betas=betas)}
        return {"g": torch.optim.Adam(self.model.generator.parameters(), lr=t.lr, betas=betas),
                "d": torch.optim.Adam([*self.disc.parameters(), *text], lr=t.d_lr, betas=betas)}

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"model": self.model, "ema": self.ema.model}
        if self.gan:
            mods["discriminator"] = self.disc
        return mods

    # --- one step --------------------------------------------------------------------

    def _seed_step(self) -> torch.Generator:
        return step_generator(self.cfg.seed, self.step, self.acc.process_index)

    def _latent(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.model.generator.z_shape), generator=gen).to(self.acc.device)

    def _update(self, name: str, loss: torch.Tensor) -> None:
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if self.acc.num_processes > 1:  # average gradients over ranks (see the module docstring)
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.acc.num_processes
        self.guarded_step(opt, params, float(loss.detach()), self.cfg.train.grad_clip)

    def gan_step(self, real: torch.Tensor, captions: list[str]) -> dict[str, float]:
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
        self._update("d", d_loss)
        self.disc.requires_grad_(False)
        fake = self.model.generator(self._latent(n, gen), _detach(cond))
        g_loss = self.loss.g(self.disc(fake, _detach(cond)))
        if self.cfg.train.reconstruction > 0:  # squared error: L1's median is the background here
            mse = (fake - real).square().mean()
            g_loss = g_loss + self.cfg.train.reconstruction * mse
            row["mse"] = float(mse.detach())
        self._update("g", g_loss)
        self.disc.requires_grad_(True)
        return {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()), **row}

    def vae_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        gen = self._seed_step()
        vae, cond = self.model.generator, self.model.encode(captions)
        mean, logvar = vae.encode(images, cond)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen).to(mean)
        loss, parts = self.loss(images, vae.decode(z, cond), mean, logvar, self.step)
        self._update("vae", loss)
        return {"loss": float(loss.detach()), **parts}

    # --- in the shared loop (TrainerBase.fit) ----------------------------------------------

    def before_fit(self) -> None:
        self.model.train()

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        step = self.gan_step if self.gan else self.vae_step
        row = step(images.to(self.acc.device), captions)
        self.ema.update(self.model, self.step)
        return row

    def pipeline(self) -> GeneratorPipeline:
        """The EMA generator as a pipeline with the run's sampling defaults."""
        return GeneratorPipeline(self.ema.model, self.cfg.sample, self.acc.device)


def _detach(cond):
    """The prompt embedding without its graph: G's loss must not train D's text encoder."""
    return None if cond is None else cond.detach()
