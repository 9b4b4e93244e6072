"""Image -> text: captioners trained from scratch, and `caption_agreement`, the metric that
closes the loop (caption a generated image, compare the caption with its prompt).

A captioner is `caption(images [N, C, H, W] in [-1, 1]) -> list[str]`. The built-in one is
Show, Attend and Tell (Xu et al. 2015) with a transformer decoder (Vaswani et al. 2017): a
small CNN turns the image into a grid of feature tokens that know their place, and a causal
decoder writes the caption word by word (greedy), reading the grid through cross-attention.
Words come from the training captions (`vocab`); a word never seen reads as <unk>.

Saved as a folder: captioner.json (options, vocabulary, class names, held-out scores) and
model.safetensors. limner ships two, trained on this 2-core CPU by
`python -m limner.plugins.captioners train configs/captioners/<name>.toml`: `shapes` and
`fashion_mnist` (plugins/weights/captioner-*/; scores in benchmarks/results/captioners.md).
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
from limner.words import clauses, named_class

WEIGHTS = Path(__file__).parent / "weights"
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


class Captioner(nn.Module):
    """CNN encoder (three stages, two stride-2 convolutions: a 32x32 image -> 8x8 tokens, plus
    a learned position per token) and a pre-norm transformer decoder over words."""

    def __init__(self, vocab: list[str], in_channels: int = 3, image_size: int = 32, channels: int = 32,
                 dim: int = 128, layers: int = 2, heads: int = 4, max_words: int = 24,
                 classes: list[str] | tuple[str, ...] = ()):
        super().__init__()
        if list(vocab[:len(SPECIAL)]) != list(SPECIAL):
            raise limner.LimnerError(f"captioner vocabulary must start with {', '.join(SPECIAL)}")
        self.options = {"vocab": list(vocab), "in_channels": in_channels, "image_size": image_size,
                        "channels": channels, "dim": dim, "layers": layers, "heads": heads, "max_words": max_words,
                        "classes": list(classes)}
        self.vocab, self.index = list(vocab), {w: i for i, w in enumerate(vocab)}
        self.in_channels, self.image_size, self.max_words, self.classes = (
            in_channels,
            image_size,
            max_words,
            tuple(classes),
        )

        self.encoder = nn.Sequential(*conv_stages(in_channels, channels), nn.Conv2d(4 * channels, dim, 1))
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.place = nn.Parameter(torch.randn(side * side, dim) * 0.02)  # one per image token
        self.words = nn.Embedding(len(vocab), dim, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(max_words + 1, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, len(vocab))

    # --- images and words --------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1 or 3, H, W] in [-1, 1] -> this captioner's channels and size."""
        return conform(images, self.in_channels, self.image_size, self.place.device, "a captioner")

    def tokens(self, captions: list[str]) -> torch.Tensor:
        """[N, max_words + 2]: <bos> words <eos>, padded; a caption too long is an error."""
        rows = []
        for text in captions:
            ids = [self.index.get(w, UNK) for w in text.lower().split()]
            if len(ids) > self.max_words:
                raise limner.LimnerError(f"caption of {len(ids)} words is longer than this captioner's "
                                         f"max_words ({self.max_words}): {text!r}")
            rows.append([BOS, *ids, EOS] + [PAD] * (self.max_words - len(ids)))
        return torch.tensor(rows, device=self.place.device)

    def unknown_words(self, texts: list[str]) -> list[str]:
        """Words of `texts` this captioner never saw in training, each once."""
        return sorted({w for t in texts for w in t.lower().split() if w not in self.index})

    # --- model ------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.encoder(self.prepare(images))  # [N, dim, h, w]
        return grid.flatten(2).transpose(1, 2) + self.place  # [N, h*w, dim]

    def logits(self, memory: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Next-word logits [N, L, V] for word ids [N, L] (L <= max_words + 1)."""
        n = words.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=words.device).triu(1)  # True: may not attend
        h = self.words(words) + self.position[:n]
        h = self.decoder(h, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=words == PAD)
        return self.head(self.norm(h))

    def loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cross-entropy of each next word given the image and the words before (teacher forcing)."""
        ids = self.tokens(captions)
        out = self.logits(self.encode(images), ids[:, :-1])
        return F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, batch: int = 256) -> list[str]:
        """Greedy captions of [N, C, H, W] images in [-1, 1]."""
        out = []
        for start in range(0, len(images), batch):
            memory = self.encode(images[start:start + batch])
            words = torch.full((len(memory), 1), BOS, device=memory.device)
            done = torch.zeros(len(memory), dtype=torch.bool, device=memory.device)
            for _ in range(self.max_words + 1):
                step = self.logits(memory, words)[:, -1].argmax(-1)
                step = torch.where(done, torch.full_like(step, PAD), step)
                words = torch.cat([words, step[:, None]], 1)
                done |= step == EOS
                if bool(done.all()):
                    break
            for row in words[:, 1:].tolist():
                text = []
                for i in row:
                    if i in (EOS, PAD):
                        break
                    text.append(self.vocab[i])
                out.append(" ".join(text))
        return out

    forward = caption


# --- folders and registered captioners --------------------------------------------------------

def load_captioner(path: str | Path) -> Captioner:
    """A captioner saved by `train` (a folder with captioner.json and model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(path)
    meta_file, weights = folder / "captioner.json", folder / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise limner.LimnerError(
            f"no captioner in {folder}: a captioner folder holds captioner.json and "
            "model.safetensors (train one with `python -m limner.plugins.captioners train CONFIG`)"
        )
    meta = json.loads(meta_file.read_text())
    model = Captioner(**meta["options"])
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    model.scores = meta.get("scores", {})
    return model.eval().requires_grad_(False)


def show_attend_tell(path: str) -> Captioner:
    """A show-attend-tell captioner from a folder (captioner.json + model.safetensors)."""
    return load_captioner(path)


def shapes() -> Captioner:
    """Captions `shapes` scenes of one or two objects: size, colour, shape and place (shipped)."""
    return load_captioner(WEIGHTS / "captioner-shapes")


def fashion_mnist() -> Captioner:
    """Captions Fashion-MNIST images with their garment, in the dataset's templates (shipped)."""
    return load_captioner(WEIGHTS / "captioner-fashion-mnist")


# --- comparing captions with prompts -----------------------------------------------------------

def agreement(captions: list[str], prompts: list[str], classes: tuple[str, ...] = ()) -> dict[str, float]:
    """How well captions say what their prompts said.

    `caption_agreement`: with class names (a class captioner), the fraction whose caption names
    the prompt's class; otherwise the fraction whose clauses equal the prompt's, in any order
    ('a red circle at the top and a blue square' == 'a blue square and a red circle at the top').
    `caption_clause_f1`: the mean F1 of caption clauses against prompt clauses (objects right)."""
    if len(captions) != len(prompts):
        raise limner.LimnerError(f"caption_agreement: {len(captions)} captions but {len(prompts)} prompts")
    if not prompts:
        raise limner.LimnerError("caption_agreement needs at least one image and prompt")
    f1s, same = [], []
    for text, prompt in zip(captions, prompts):
        got, want = clauses(text), clauses(prompt)
        hits = sum(min(got.count(c), want.count(c)) for c in set(want))
        f1s.append(2 * hits / (len(got) + len(want)) if got or want else 1.0)
        if classes:
            wanted = named_class(prompt, classes)
            if wanted is None:
                raise limner.LimnerError(f"caption_agreement: the prompt {prompt!r} names none of the captioner's "
                                         f"classes ({', '.join(classes)})")
            same.append(named_class(text, classes) == wanted)
        else:
            same.append(sorted(got) == sorted(want))
    return {"caption_agreement": sum(same) / len(same), "caption_clause_f1": sum(f1s) / len(f1s)}


def caption_agreement(captioner: str | None = None):
    """Caption each generated image and compare with its prompt (see `agreement`). `captioner`:
    a registered name or a folder; default, the registered captioner that knows every word of
    the prompts (a prompt from another dataset is an error naming the words)."""

    def metric(images, prompts):
        if len(images) != len(prompts):
            raise limner.LimnerError(f"caption_agreement: {len(images)} images but {len(prompts)} prompts")
        model = _captioner_for(prompts, captioner)
        return agreement(model.caption(images), list(prompts), model.classes)

    return metric


def _captioner_for(prompts: list[str], name: str | None) -> Captioner:
    if name is not None:
        model = limner.load_captioner(name)
        unknown = model.unknown_words(prompts)
        if unknown:
            raise limner.LimnerError(f"caption_agreement: the captioner {name} never saw the words "
                                     f"{', '.join(unknown[:12])} in training: its captions cannot match these prompts; "
                                     "use a captioner trained on this dataset")
        return model
    tried = {}
    for candidate in limner.list_components("captioners")["captioners"]:
        if candidate == "show_attend_tell":  # reads a folder: not a candidate by itself
            continue
        try:
            model = limner.create("captioners", candidate)
        except limner.LimnerError as exc:  # e.g. a plugin's captioner that needs options
            tried[candidate] = f"could not be built without options ({exc})"
            continue
        unknown = model.unknown_words(prompts)
        if not unknown:
            return model
        tried[candidate] = f"lacks {', '.join(unknown[:6])}"
    raise limner.LimnerError("caption_agreement: no registered captioner knows these prompts' words ("
                             + "; ".join(f"{n} {why}" for n, why in tried.items())
                             + "); train one on this dataset and pass it as captioner=<folder>")


# --- training (python -m limner.plugins.captioners train CONFIG) -------------------------------

def _materialise(dataset, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every item of a dataset as uint8 images [N, C, H, W] and captions (drawn once, reused)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    first, _ = dataset[0]
    images = torch.empty((n, *first.shape), dtype=torch.uint8)
    captions = []
    for i in range(n):
        image, text = dataset[i]
        images[i] = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        captions.append(text)
    return images, captions


def _unit8_to_images(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def evaluate(model: Captioner, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Exact-match rate (clauses in any order), clause F1 and, for a class captioner, class-word accuracy."""
    got = model.caption(_unit8_to_images(images))
    scores = agreement(got, captions)
    out = {"exact_match": scores["caption_agreement"], "clause_f1": scores["caption_clause_f1"]}
    if model.classes:
        out["class_word"] = agreement(got, captions, model.classes)["caption_agreement"]
    return out


SCHEMA = {  # section -> (its keys, the required ones); "" is the top level
    "": ({"out", "seed", "data", "model", "train", "eval"}, {"out", "data", "train", "eval"}),
    "data": ({"dataset", "batch_size", "items"}, {"dataset"}),
    "model": ({"channels", "dim", "layers", "heads", "classes"}, set()),
    "train": ({"steps", "lr", "warmup"}, {"steps"}),
    "eval": ({"dataset"}, {"dataset"}),
}


def read_config(path: str | Path) -> dict:
    """A captioner training config (configs/captioners/*.toml), its keys and datasets checked."""
    from limner.config import read_toml

    file = Path(path)
    cfg = read_toml(file)
    for section, (allowed, required) in SCHEMA.items():
        table = cfg if not section else cfg.get(section, {})
        where = f"[{section}] " if section else ""
        if not isinstance(table, dict):
            raise limner.LimnerError(f"{file}: {where or section} must be a table")
        unknown, missing = sorted(set(table) - allowed), sorted(required - set(table))
        if unknown:
            raise limner.LimnerError(f"{file}: {where}unknown key {unknown[0]!r}; valid: {', '.join(sorted(allowed))}")
        if missing:
            raise limner.LimnerError(f"{file}: {where}needs {', '.join(missing)}")
    known = limner.list_components("datasets")["datasets"]
    for section in ("data", "eval"):
        spec = cfg[section]["dataset"]
        if not isinstance(spec, dict) or spec.get("name") not in known:
            raise limner.LimnerError(f"{file}: [{section}] dataset must be {{ name = ..., options }} naming one of "
                                     f"{', '.join(known)}; got {spec!r}")
    return cfg


def train(config: str | Path) -> dict:
    """Train a captioner as a TOML config says, save it, return its held-out scores."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from limner.files import write_text_atomic

    cfg = read_config(config)
    data, model_cfg, train_cfg, eval_cfg = cfg["data"], cfg.get("model", {}), cfg["train"], cfg["eval"]
    torch.manual_seed(cfg.get("seed", 0))
    spec = dict(data["dataset"])
    dataset = limner.create("datasets", spec.pop("name"), **spec)
    start = time.perf_counter()
    images, captions = _materialise(dataset, data.get("items"))
    held_spec = dict(eval_cfg["dataset"])
    held_images, held_captions = _materialise(limner.create("datasets", held_spec.pop("name"), **held_spec))
    words = sorted({w for text in captions for w in text.lower().split()})
    model = Captioner(list(SPECIAL) + words, in_channels=images.shape[1], image_size=images.shape[-1],
                      max_words=max(len(t.split()) for t in captions), **model_cfg)
    steps, batch = train_cfg["steps"], data.get("batch_size", 64)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.get("lr", 1e-3), weight_decay=0.01)
    warmup = train_cfg.get("warmup", 200)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to zero
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    model.train()
    bar = tqdm(range(steps), desc="captioner", unit="step", file=sys.stderr)
    for step in bar:
        pick = torch.randint(len(images), (batch,), generator=gen)
        loss = model.loss(_unit8_to_images(images[pick]), [captions[i] for i in pick.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    minutes = (time.perf_counter() - start) / 60
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    meta = {"captioner": "show_attend_tell", "options": model.options, "config": str(config)}
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    write_text_atomic(out / "captioner.json", json.dumps(meta, indent=1) + "\n")
    shipped = load_captioner(out)  # scored as saved (float16 weights), so the numbers are the folder's
    meta["scores"] = {**evaluate(shipped, held_images, held_captions), "held_out": len(held_captions),
                      "steps": steps, "cpu_minutes": round(minutes, 2), "threads": torch.get_num_threads()}
    write_text_atomic(out / "captioner.json", json.dumps(meta, indent=1) + "\n")
    return meta["scores"]


if __name__ == "__main__":  # python -m limner.plugins.captioners train CONFIG
    if len(sys.argv) != 3 or sys.argv[1] != "train":
        sys.exit("usage: python -m limner.plugins.captioners train CONFIG.toml")
    try:
        print(json.dumps(train(sys.argv[2]), indent=1))
    except limner.LimnerError as exc:
        sys.exit(f"Error: {exc}")
