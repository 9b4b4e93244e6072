"""A third party's training recipe, `prototype`: text -> the mean image of its prompt.

A small MLP maps the prompt's pooled text embedding to an image and is trained by squared
error to the batch's images: for a prompt that pins its picture down (one object of one
colour at one place) that mean is the picture. All it writes is the model, the step and the
pipeline; the loop, logging, progress bar, checkpoints, exact resume and `limner sample` /
`limner eval` come from limner (`limner.train.TrainerBase`, `limner.recipes.Recipe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from limner.config import ComponentConfig, bounded, component
from limner.ema import EMA
from limner.pipeline import PipelineBase
from limner.recipes import Recipe
from limner.train import DataConfig, LoopConfig, RunConfig, TrainerBase


@dataclass
class ProtoData(DataConfig):
    batch_size: int = bounded(16, ge=1)


@dataclass
class ProtoModel:
    text_encoder: ComponentConfig = component("text_encoders")
    image_size: int = bounded(32, ge=1)
    channels: int = bounded(3, ge=1)
    hidden: int = bounded(128, ge=1)


@dataclass(kw_only=True)
class ProtoTrain(LoopConfig):
    """[train]: the loop's settings (limner.train.LoopConfig) and this recipe's own."""

    steps: int = bounded(100, ge=1)  # two of the loop's settings, with other defaults
    log_every: int = bounded(10, ge=1)
    lr: float = bounded(1e-3, gt=0)
    ema: float = bounded(0.99, ge=0, lt=1)
    grad_clip: float = bounded(1.0, ge=0)


@dataclass
class ProtoSample:
    prompts: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ProtoConfig(RunConfig):
    """The run config: out, recipe, seed and [eval] come from limner.train.RunConfig."""

    data: ProtoData = field(default_factory=ProtoData)
    model: ProtoModel = field(default_factory=ProtoModel)
    train: ProtoTrain = field(default_factory=ProtoTrain)
    sample: ProtoSample = field(default_factory=ProtoSample)


class Prototype(nn.Module):
    """Prompt -> pooled text embedding -> MLP -> image in [-1, 1]."""

    def __init__(self, cfg: ProtoModel):
        super().__init__()
        self.shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.text_encoder = cfg.text_encoder.build()
        self.head = nn.Sequential(nn.Linear(self.text_encoder.dim, cfg.hidden), nn.SiLU(),
                                  nn.Linear(cfg.hidden, cfg.channels * cfg.image_size ** 2))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        pooled = self.text_encoder.encode(list(prompts)).pooled
        return self.head(pooled).view(-1, *self.shape).tanh()


class ProtoPipeline(PipelineBase):
    """Draws the model's image of each prompt (the same for every seed: it has no noise). The base
    puts the model on its device, turns `pipe(prompts)` into PIL images, expands `num` and refuses
    options that do not apply."""

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, *, seed: int | list[int] = 0, num: int = 1, progress: bool = False,
                 **others) -> torch.Tensor:
        self.refuse(others, "the prototype recipe draws without noise or steps (it takes prompts, seed and num)")
        return self.model(self.expand(prompts, num))


class ProtoTrainer(TrainerBase):
    """Squared error of the model's image to the batch's image, Adam, EMA."""

    def __init__(self, cfg: ProtoConfig):
        self.setup(cfg)  # accelerator, seed, run folder, step 0
        self.model = Prototype(cfg.model).to(self.acc.device)
        self.ema = EMA(self.model, cfg.train.ema)
        self.opts = {"model": torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)}
        self.setup_data(cfg.model.channels, cfg.model.image_size)  # dataset, non-finite guard

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "ema": self.ema.model}

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        loss = (self.model(captions) - images.to(self.acc.device)).square().mean()
        opt = self.opts["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not self.guarded_step(opt, list(self.model.parameters()), loss.item(), self.cfg.train.grad_clip):
            return None
        self.ema.update(self.model, self.step)
        return {"loss": loss.item()}

    def pipeline(self) -> ProtoPipeline:
        return ProtoPipeline(self.ema.model, self.cfg.sample, self.acc.device)


def prototype() -> Recipe:
    """Text -> the mean image of its prompt, by squared error (the example plugin's recipe)."""
    return Recipe(config=ProtoConfig, trainer=ProtoTrainer, model=lambda cfg: Prototype(cfg.model),
                  pipeline=ProtoPipeline)
