"""Image-text matching: a small contrastive model trained here, the offline stand-in for CLIP
score, and the `matching_score` metric built on it.

The model is CLIP's recipe (Radford et al. 2021) at toy scale: a small CNN embeds the image,
the frozen pretrained MiniLM's pooled vector (through one linear layer) embeds the text, and
a symmetric InfoNCE loss over the batch pulls each image toward its own caption and away from
the others'. `matching_score` reports the mean cosine similarity x 100 of each image with its
prompt (CLIP score's scale, Hessel et al. 2021) and the share of images whose own prompt is the
best match among the set's distinct prompts (`matching_top1`), which reads more directly.

Trained by `limner train configs/matchers/<name>.toml` (the `matcher` recipe on limner's one
loop: resumable, logged) into RUN/matcher/ (matcher.json + model.safetensors); shipped as
plugins/weights/matcher-<name>/.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.checkpoint import write_weights
from limner.config import bounded
from limner.evaluation import held_out_items
from limner.files import write_text_atomic
from limner.images import conform
from limner.nn import conv_stages
from limner.recipes import Recipe
from limner.train import DataConfig, LossTrainer, RunConfig, WarmupCosineConfig

WEIGHTS = Path(__file__).parent / "weights"


class Matcher(nn.Module):
    """Image encoder (three conv stages, mean-pooled) and text projection into one unit sphere."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, channels: int = 32, dim: int = 128):
        super().__init__()
        self.options = {"in_channels": in_channels, "image_size": image_size, "channels": channels, "dim": dim}
        self.in_channels, self.image_size = in_channels, image_size

        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.image = nn.Sequential(
            *conv_stages(in_channels, channels),  # flattened, not pooled: where things are counts
            nn.Flatten(1),
            nn.Linear(4 * channels * side * side, dim),
        )
        self.text_encoder = limner.create("text_encoders", "minilm")  # frozen, from its package
        self.text = nn.Linear(self.text_encoder.dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return conform(images, self.in_channels, self.image_size, self.log_scale.device, "a matcher")

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(self.prepare(images)), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            pooled = self.text_encoder.encode(list(texts)).pooled
        return F.normalize(self.text(pooled.to(self.log_scale.device)), dim=-1)

    def loss(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Symmetric InfoNCE; pairs with the same caption are not counted as negatives."""
        a, b = self.embed_images(images), self.embed_texts(texts)
        logits = self.log_scale.exp() * a @ b.T
        same = torch.tensor([[x == y for y in texts] for x in texts], device=logits.device)
        logits = logits.masked_fill(same & ~torch.eye(len(texts), dtype=torch.bool, device=logits.device), -1e4)
        target = torch.arange(len(texts), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Mean cosine x 100 of each image with its prompt; top-1 among the distinct prompts."""
        if len(images) != len(prompts):
            raise limner.LimnerError(f"matching_score: {len(images)} images but {len(prompts)} prompts")
        distinct = list(dict.fromkeys(prompts))
        img = torch.cat([self.embed_images(images[i:i + 256]) for i in range(0, len(images), 256)])
        txt = self.embed_texts(distinct)
        sims = img @ txt.T  # [N, distinct]
        own = torch.tensor([distinct.index(p) for p in prompts])
        return {"matching_score": float(100 * sims[torch.arange(len(prompts)), own].clamp(min=0).mean()),
                "matching_top1": float((sims.argmax(1).cpu() == own).float().mean())}


def load_matcher(path: str | Path) -> Matcher:
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / "matcher.json").is_file() or not (folder / "model.safetensors").is_file():
        raise limner.LimnerError(f"no image-text matcher in {folder}: it holds matcher.json and model.safetensors "
                                 "(train one with `limner train CONFIG`, recipe = 'matcher')")
    meta = json.loads((folder / "matcher.json").read_text())
    model = Matcher(**meta["options"])
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    model.load_state_dict(state)  # the frozen MiniLM's weights are filled from its package
    model.scores = meta.get("scores", {})
    return model.eval().requires_grad_(False)


def matching_score(matcher: str = "shapes"):
    """Image-text matching with limner's contrastive model (`matcher`: a shipped one, shapes or
    fashion_mnist, or a folder): mean cosine x 100 of image and prompt, and top-1 retrieval."""
    folder = Path(matcher) if Path(matcher).is_dir() else WEIGHTS / f"matcher-{matcher.replace('_', '-')}"
    if not folder.is_dir():
        shipped = sorted(p.name.removeprefix("matcher-") for p in WEIGHTS.glob("matcher-*"))
        raise limner.LimnerError(f"matching_score: no matcher {matcher!r}; shipped: {', '.join(shipped)}, or give a "
                                 "folder")

    def metric(images, prompts):
        return load_matcher(folder).score(images, list(prompts))

    return metric


# --- training: the `matcher` recipe on limner's one loop (limner train CONFIG) ----------------

@dataclass
class MatcherModelConfig:
    """[model]: the image tower's width and the shared embedding's; in_channels and image_size
    are read from the training data when left out (the run's config.toml records them)."""

    channels: int = bounded(32, ge=1)
    dim: int = bounded(128, ge=1)
    in_channels: int = bounded(0, ge=0)
    image_size: int = bounded(0, ge=0)


@dataclass(kw_only=True)
class MatcherOptimConfig(WarmupCosineConfig):
    """[train]: the loop's settings and AdamW with a linear warm-up and a cosine decay to zero."""


@dataclass(kw_only=True)
class MatcherRunConfig(RunConfig):
    """A matcher run (recipe = "matcher"); [eval] dataset is the held-out set it is scored on
    ([eval] prompts: how many of its items, 0 = all)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: MatcherModelConfig = field(default_factory=MatcherModelConfig)
    train: MatcherOptimConfig = field(default_factory=MatcherOptimConfig)


def model_options(cfg: MatcherModelConfig) -> dict:
    return {"in_channels": cfg.in_channels, "image_size": cfg.image_size, "channels": cfg.channels, "dim": cfg.dim}


class MatcherTrainer(LossTrainer):
    """Symmetric InfoNCE over each batch, AdamW; at the end the matcher folder."""

    def __init__(self, cfg: MatcherRunConfig):
        self.setup(cfg)
        m = cfg.model
        if not m.in_channels or not m.image_size:
            channels, size = self.data_shape()
            m.in_channels, m.image_size = m.in_channels or channels, m.image_size or size
        self.use_model(Matcher(**model_options(m)))

    def finish(self) -> dict:
        """The matcher folder (out/matcher: matcher.json + float16 weights, the frozen text
        encoder's left out), scored as saved, also against shuffled prompts (the floor)."""
        folder = self.out / "matcher"
        meta = {"options": model_options(self.cfg.model), "step": self.step}
        write_weights(folder / "model.safetensors", self.model.state_dict(), half=True)
        write_text_atomic(folder / "matcher.json", json.dumps(meta, indent=1) + "\n")
        shipped = load_matcher(folder)
        images, captions = held_out_items(self.cfg.eval)
        shuffled = captions[1:] + captions[:1]
        meta["scores"] = {**shipped.score(images, captions),
                          "matching_score_shuffled_prompts": shipped.score(images, shuffled)["matching_score"],
                          "held_out": len(captions), "steps": self.step,
                          "cpu_minutes": round(self.train_seconds() / 60, 2)}
        write_text_atomic(folder / "matcher.json", json.dumps(meta, indent=1) + "\n")
        return meta["scores"]


def matcher_recipe() -> Recipe:
    """Train an image-text matcher; `matching_score` takes `matcher = "RUN/matcher"`."""
    return Recipe(config=MatcherRunConfig, trainer=MatcherTrainer,
                  model=lambda cfg: Matcher(**model_options(cfg.model)), pipeline=None, outputs=frozenset({"matcher"}))
