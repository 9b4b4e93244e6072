"""limner's own training recipes, registered like any other component: `diffusion`
(text-to-image EDM diffusion), `gan` and `vae` (a generator in one step)."""
from __future__ import annotations

from limner.recipes import Recipe


def diffusion() -> Recipe:
    """Text-to-image diffusion: a denoiser trained with the EDM loss, sampled by any sampler."""
    from limner.pipeline import Pipeline
    from limner.t2i import TextToImage
    from limner.train import Trainer, TrainConfig

    return Recipe(config=TrainConfig, trainer=Trainer, model=lambda cfg: TextToImage(cfg.model), pipeline=Pipeline)


def _generator() -> Recipe:
    from limner.gan import GeneratorModel, GeneratorPipeline, GenTrainConfig
    from limner.gan_train import GenTrainer

    return Recipe(config=GenTrainConfig, trainer=GenTrainer, model=lambda cfg: GeneratorModel(cfg.model),
                  pipeline=GeneratorPipeline)


def gan() -> Recipe:
    """A text-conditional GAN: generator and discriminator updates per step, EMA generator."""
    return _generator()


def vae() -> Recipe:
    """A conditional VAE trained on its ELBO."""
    return _generator()
