"""Image-text matching: a small contrastive model trained here, the offline stand-in for CLIP
score, and the `matching_score` metric built on it.

The model is CLIP's recipe (Radford et al. 2021) at toy scale: a small CNN embeds the image,
the frozen pretrained MiniLM's pooled vector (through one linear layer) embeds the text, and
a symmetric InfoNCE loss over the batch pulls each image toward its own caption and away from
the others'. `matching_score` reports the mean cosine similarity x 100 of each image with its
prompt (CLIP score's scale, Hessel et al. 2021) and the share of images whose own prompt is the
best match among the set's distinct prompts (`matching_top1`), which reads more directly.

Trained and shipped by `python -m limner.plugins.matching train configs/matchers/<name>.toml`
(plugins/weights/matcher-<name>/: matcher.json + model.safetensors).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.images import conform
from limner.nn import conv_stages

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
                                 "(train one with `python -m limner.plugins.matching train CONFIG`)")
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


# --- training (python -m limner.plugins.matching train CONFIG) ----------------------------------

def train(config: str | Path) -> dict:
    """Train a matcher as a TOML config says ([data] dataset, batch_size; [model]; [train] steps,
    lr; [eval] dataset; out), save it, return its held-out scores."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from limner.config import read_toml
    from limner.files import write_text_atomic

    cfg = read_toml(config)
    missing = [k for k in ("out", "data", "train", "eval") if k not in cfg]
    missing += [f"{s}.{k}" for s, k in (("data", "dataset"), ("train", "steps"), ("eval", "dataset"))
                if k not in cfg.get(s, {})]
    if missing:
        raise limner.LimnerError(f"{config}: needs {', '.join(missing)} (see configs/matchers/shapes.toml)")
    torch.manual_seed(cfg.get("seed", 0))

    def materialise(spec):
        spec = dict(spec)
        data = limner.create("datasets", spec.pop("name"), **spec)
        pairs = [data[i] for i in range(len(data))]
        return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]

    start = time.perf_counter()
    images, captions = materialise(cfg["data"]["dataset"])
    held_images, held_captions = materialise(cfg["eval"]["dataset"])
    model = Matcher(in_channels=images.shape[1], image_size=images.shape[-1], **cfg.get("model", {}))
    trained = [p for p in model.parameters() if p.requires_grad]
    steps, batch = cfg["train"]["steps"], cfg["data"].get("batch_size", 64)
    opt = torch.optim.AdamW(trained, lr=cfg["train"].get("lr", 1e-3), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    model.train()
    for _ in tqdm(range(steps), desc="matcher", unit="step", file=sys.stderr):
        pick = torch.randint(len(images), (batch,), generator=gen)
        loss = model.loss(images[pick], [captions[i] for i in pick.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    save_file({k: v.detach().half().contiguous() for k, v in own.items()}, out / "model.safetensors")
    meta = {"options": model.options, "config": str(config)}
    write_text_atomic(out / "matcher.json", json.dumps(meta, indent=1) + "\n")
    shipped = load_matcher(out)
    shuffled = held_captions[1:] + held_captions[:1]
    meta["scores"] = {**shipped.score(held_images, held_captions),
                      "matching_score_shuffled_prompts": shipped.score(held_images, shuffled)["matching_score"],
                      "held_out": len(held_captions), "steps": steps,
                      "cpu_minutes": round((time.perf_counter() - start) / 60, 2)}
    write_text_atomic(out / "matcher.json", json.dumps(meta, indent=1) + "\n")
    return meta["scores"]


if __name__ == "__main__":  # python -m limner.plugins.matching train CONFIG
    if len(sys.argv) != 3 or sys.argv[1] != "train":
        sys.exit("usage: python -m limner.plugins.matching train CONFIG.toml")
    try:
        print(json.dumps(train(sys.argv[2]), indent=1))
    except limner.LimnerError as exc:
        sys.exit(f"Error: {exc}")
