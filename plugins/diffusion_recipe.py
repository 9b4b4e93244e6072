"""The `diffusion` recipe, registered like any other component: text-to-image EDM diffusion. Its
parts are the framework's own, because sampling, the demo and `limner eval` build on them:
the run config (limner.train.TrainConfig), the trainer (limner.train.Trainer), the model
(limner.t2i.TextToImage) and the pipeline (limner.pipeline.Pipeline). The `gan` and `vae`
recipes live whole in generator_recipes.py."""
from __future__ import annotations

from limner.recipes import Recipe


def diffusion() -> Recipe:
    """Text-to-image diffusion: a denoiser trained with the EDM loss, sampled by any sampler."""
    from limner.pipeline import Pipeline
    from limner.t2i import TextToImage
    from limner.train import TrainConfig, Trainer

    return Recipe(config=TrainConfig, trainer=Trainer, model=lambda cfg: TextToImage(cfg.model), pipeline=Pipeline)
