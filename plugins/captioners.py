"""Image -> text: captioners trained from scratch, and `caption_agreement`, the metric that
closes the loop (caption a generated image, compare the caption with its prompt).

A captioner is `caption(images [N, C, H, W] in [-1, 1]) -> list[str]`. The built-in one is
Show, Attend and Tell (Xu et al. 2015) with a transformer decoder (Vaswani et al. 2017): a
small CNN turns the image into a grid of feature tokens that know their place, and a causal
decoder writes the caption word by word (greedy), reading the grid through cross-attention.
Words come from the training captions (`vocab`); a word never seen reads as <unk>.

Saved as a folder: captioner.json (options, vocabulary, class names, held-out scores) and
model.safetensors. Trained by `limner train configs/captioners/<name>.toml` (the `captioner`
recipe on limner's one loop: resumable, logged) into RUN/captioner/. limner ships two, trained
on this 2-core CPU: `shapes` and `fashion_mnist` (plugins/weights/captioner-*/; scores in
benchmarks/results/captioners.md).
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
from limner.checkpoint import ATTACHED, attach, write_weights
from limner.config import bounded
from limner.evaluation import held_out_items
from limner.files import path_inside, write_text_atomic
from limner.images import conform
from limner.nn import conv_stages
from limner.recipes import Recipe
from limner.train import DataConfig, LossTrainer, RunConfig, WarmupCosineConfig
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


class PrefixCaptioner(nn.Module):
    """ClipCap (Mokady et al. 2021) with a small CNN in place of CLIP's image encoder: the image
    becomes `prefix_side`^2 embeddings in a frozen decoder-only language model's input space (a
    pooled grid of CNN features, each with a learnt place), and the language model writes the
    caption after them, greedily, in its own vocabulary. Only the image network trains; the
    language model (a registered text encoder with a `.model` Llama and `.tokenizer`, by
    default `smollm2`) stays out of the saved weights."""

    def __init__(self, words: list[str], llm: str | dict = "smollm2", in_channels: int = 3, image_size: int = 32,
                 channels: int = 32, prefix_side: int = 4, max_tokens: int = 24,
                 classes: list[str] | tuple[str, ...] = ()):
        super().__init__()
        self.options = {"words": list(words), "llm": llm, "in_channels": in_channels, "image_size": image_size,
                        "channels": channels, "prefix_side": prefix_side, "max_tokens": max_tokens,
                        "classes": list(classes)}
        self.words, self.classes = set(words), tuple(classes)
        self.in_channels, self.image_size, self.max_tokens, self.prefix_side = (in_channels, image_size, max_tokens,
                                                                                  prefix_side)
        spec = dict(llm) if isinstance(llm, dict) else {"name": llm}  # a name, or {name = ..., options}
        self.llm = limner.create("text_encoders", spec.pop("name", ""), **spec)
        if not hasattr(self.llm, "model") or not hasattr(self.llm, "tokenizer"):
            raise limner.LimnerError(f"the {llm!r} text encoder is not a language model limner can write with "
                                     "(a Llama GGUF encoder: smollm2 or gguf_llm)")
        dim = self.llm.model.dim
        self.encoder = nn.Sequential(*conv_stages(in_channels, channels), nn.Conv2d(4 * channels, dim, 1))
        self.place = nn.Parameter(torch.randn(prefix_side * prefix_side, dim) * 0.02)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return conform(images, self.in_channels, self.image_size, self.place.device, "a captioner")

    def unknown_words(self, texts: list[str]) -> list[str]:
        """Words of `texts` absent from the training captions (the model writes any word, but was taught these)."""
        return sorted({w for t in texts for w in t.lower().split() if w not in self.words})

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        grid = F.adaptive_avg_pool2d(self.encoder(self.prepare(images)), self.prefix_side)
        return grid.flatten(2).transpose(1, 2) + self.place  # [N, P, dim]

    def _run(self, prefix: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        """Next-token logits [N, 1 + P + L, V] for <start> prefix ids (right-padded)."""
        lm = self.llm.model
        n, p = prefix.shape[:2]
        length = max((len(r) for r in ids), default=0)
        tokens = torch.zeros(n, length, dtype=torch.long, device=prefix.device)
        mask = torch.ones(n, 1 + p + length, dtype=torch.bool, device=prefix.device)
        for i, r in enumerate(ids):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, 1 + p + len(r):] = False
        start = lm.embed(tokens.new_full((n, 1), self.llm.bos))
        inputs = torch.cat([start, prefix.to(start.dtype), lm.embed(tokens)], dim=1)
        return lm.head(lm.output_norm(lm(None, mask, inputs=inputs)[-1]))

    def loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cross-entropy of each caption token and the end token after the image's prefix."""
        ids = [self.llm.tokenizer.encode(c, add_special_tokens=False).ids[: self.max_tokens] + [self.llm.eos]
               for c in captions]
        prefix = self.prefix(images)
        logits = self._run(prefix, [r[:-1] for r in ids])
        p = prefix.shape[1]
        target = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)
        for i, r in enumerate(ids):  # the hidden state before each token predicts it
            target[i, p: p + len(r)] = torch.tensor(r, dtype=torch.long)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, batch: int = 64) -> list[str]:
        """Greedy captions of [N, C, H, W] images in [-1, 1] (at most max_tokens tokens): the
        prefix is read once, then each written token alone against the cached keys and values
        (a row that has ended keeps being fed its end token, unread, so positions stay aligned)."""
        lm, out = self.llm.model, []
        for start in range(0, len(images), batch):
            prefix = self.prefix(images[start:start + batch])
            n = len(prefix)
            cache = lm.new_cache()
            first = lm.embed(torch.full((n, 1), self.llm.bos, dtype=torch.long, device=prefix.device))
            inputs = torch.cat([first, prefix.to(first.dtype)], dim=1)
            h = lm(None, torch.ones(n, inputs.shape[1], dtype=torch.bool, device=prefix.device), inputs=inputs,
                   cache=cache)[-1][:, -1]
            rows: list[list[int]] = [[] for _ in range(n)]
            done = [False] * n
            for written in range(1, self.max_tokens + 1):
                nxt = lm.head(lm.output_norm(h)).argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        done[i] = t == self.llm.eos
                        if not done[i]:
                            rows[i].append(t)
                if all(done) or written == self.max_tokens:
                    break
                fed = torch.where(torch.tensor(done, device=nxt.device), self.llm.eos, nxt)[:, None]
                mask = torch.ones(n, cache.length + 1, dtype=torch.bool, device=prefix.device)
                h = lm(fed, mask, cache=cache)[-1][:, -1]
            out += [self.llm.tokenizer.decode(r).strip() for r in rows]
        return out

    forward = caption


# [model] decoder -> the component that reads its folders, and its class
DECODERS = {"transformer": ("show_attend_tell", Captioner), "llm": ("llm_prefix", PrefixCaptioner)}


# --- folders and registered captioners --------------------------------------------------------

def load_captioner(path: str | Path) -> Captioner | PrefixCaptioner:
    """A captioner saved by `train` (a folder with captioner.json and model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(path)
    meta_file, weights = folder / "captioner.json", folder / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise limner.LimnerError(
            f"no captioner in {folder}: a captioner folder holds captioner.json and "
            "model.safetensors (train one with `limner train CONFIG`, recipe = 'captioner')"
        )
    meta = json.loads(meta_file.read_text())
    cls = next((c for name, c in DECODERS.values() if name == meta.get("captioner")), Captioner)
    options = dict(meta["options"])
    llm = options.get("llm")
    if isinstance(llm, dict) and isinstance(llm.get("path"), str):  # a file the folder carries (train's finish)
        inside = path_inside(folder, llm["path"])
        if inside is None:
            raise limner.LimnerError(f"{meta_file}: its language model reads path = {llm['path']!r}, outside the "
                                     "captioner folder; a captioner's files must lie inside it")
        options["llm"] = {**llm, "path": str(inside)}
    model = cls(**options)
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    model.scores = meta.get("scores", {})
    return model.eval().requires_grad_(False)


def show_attend_tell(path: str) -> Captioner:
    """A show-attend-tell captioner from a folder (captioner.json + model.safetensors)."""
    return load_captioner(path)


def llm_prefix(path: str) -> PrefixCaptioner:
    """A language-model captioner (ClipCap) from a folder (captioner.json + model.safetensors)."""
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
        if candidate in {name for name, _ in DECODERS.values()}:  # read a folder: not candidates by themselves
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


# --- training: the `captioner` recipe on limner's one loop (limner train CONFIG) -------------

@dataclass
class CaptionerModelConfig:
    """[model]: the network's sizes. vocab, max_words, in_channels and image_size are read from
    the training data when left out (the run's config.toml then records them)."""

    channels: int = bounded(32, ge=1)
    dim: int = bounded(128, ge=1)
    layers: int = bounded(2, ge=1)
    heads: int = bounded(4, ge=1)
    classes: list[str] = field(default_factory=list)  # class words a class captioner is scored on
    decoder: str = "transformer"  # or "llm": a frozen language model writes (PrefixCaptioner, ClipCap)
    llm: str | dict = "smollm2"  # with decoder = "llm": the text encoder whose language model writes
    prefix_side: int = bounded(4, ge=1)  # with decoder = "llm": the image is prefix_side^2 prefix embeddings
    vocab: list[str] = field(default_factory=list)
    max_words: int = bounded(0, ge=0)
    in_channels: int = bounded(0, ge=0)
    image_size: int = bounded(0, ge=0)


@dataclass(kw_only=True)
class CaptionerOptimConfig(WarmupCosineConfig):
    """[train]: the loop's settings and AdamW with a linear warm-up and a cosine decay to zero."""

    warmup: int = bounded(200, ge=0)
    grad_clip: float = bounded(1.0, ge=0)


@dataclass(kw_only=True)
class CaptionerRunConfig(RunConfig):
    """A captioner run (recipe = "captioner"); [eval] dataset is the held-out set it is scored on
    ([eval] prompts: how many of its items, 0 = all)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: CaptionerModelConfig = field(default_factory=CaptionerModelConfig)
    train: CaptionerOptimConfig = field(default_factory=CaptionerOptimConfig)


def model_options(cfg: CaptionerModelConfig) -> dict:
    if cfg.decoder == "llm":
        return {"words": cfg.vocab[len(SPECIAL):], "llm": cfg.llm, "in_channels": cfg.in_channels,
                "image_size": cfg.image_size, "channels": cfg.channels, "prefix_side": cfg.prefix_side,
                "max_tokens": 3 * cfg.max_words, "classes": cfg.classes}
    return {"vocab": cfg.vocab, "in_channels": cfg.in_channels, "image_size": cfg.image_size,
            "channels": cfg.channels, "dim": cfg.dim, "layers": cfg.layers, "heads": cfg.heads,
            "max_words": cfg.max_words, "classes": cfg.classes}


def build(cfg: CaptionerModelConfig) -> Captioner | PrefixCaptioner:
    if cfg.decoder not in DECODERS:
        raise limner.LimnerError(f"[model] decoder must be 'transformer' (show-attend-tell) or 'llm' (a frozen "
                                 f"language model writes: ClipCap), got {cfg.decoder!r}")
    return DECODERS[cfg.decoder][1](**model_options(cfg))


class CaptionerTrainer(LossTrainer):
    """Cross-entropy of each next word (teacher forcing), AdamW; at the end the captioner folder."""

    def __init__(self, cfg: CaptionerRunConfig):
        self.setup(cfg)
        m = cfg.model
        if m.dim % m.heads:
            raise limner.LimnerError(f"[model] dim ({m.dim}) must be a multiple of heads ({m.heads})")
        if not m.vocab or not m.max_words or not m.in_channels or not m.image_size:
            data = self.load_dataset()
            captions = [data[i][1] for i in range(len(data))]
            image, _ = data[0]
            m.vocab = m.vocab or list(SPECIAL) + sorted({w for text in captions for w in text.lower().split()})
            m.max_words = m.max_words or max(len(t.split()) for t in captions)
            m.in_channels, m.image_size = m.in_channels or image.shape[0], m.image_size or image.shape[-1]
        self.use_model(build(m))

    def finish(self) -> dict:
        """The captioner folder (out/captioner: captioner.json + float16 weights, and in files/ the
        GGUF file a `gguf_llm` language model reads), scored as saved."""
        folder = self.out / "captioner"
        options = model_options(self.cfg.model)
        llm = options.get("llm")
        if isinstance(llm, dict) and isinstance(llm.get("path"), str):  # the GGUF file goes with the folder
            source = Path(llm["path"]).resolve()
            (folder / ATTACHED).mkdir(parents=True, exist_ok=True)
            (folder / ATTACHED / source.name).unlink(missing_ok=True)  # a rerun's file replaces the last one's
            attach(source, folder / ATTACHED / source.name)
            options["llm"] = {**llm, "path": f"{ATTACHED}/{source.name}"}
        meta = {"captioner": DECODERS[self.cfg.model.decoder][0], "options": options, "step": self.step}
        write_weights(folder / "model.safetensors", self.model.state_dict(), half=True)
        write_text_atomic(folder / "captioner.json", json.dumps(meta, indent=1) + "\n")
        images, captions = held_out_items(self.cfg.eval)
        meta["scores"] = {**evaluate(load_captioner(folder), images, captions), "held_out": len(captions),
                          "steps": self.step, "cpu_minutes": round(self.train_seconds() / 60, 2),
                          "threads": torch.get_num_threads()}
        write_text_atomic(folder / "captioner.json", json.dumps(meta, indent=1) + "\n")
        return meta["scores"]


def evaluate(model: Captioner | PrefixCaptioner, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Exact-match rate (clauses in any order), clause F1 and, for a class captioner, class-word accuracy."""
    got = model.caption(images)
    scores = agreement(got, captions)
    out = {"exact_match": scores["caption_agreement"], "clause_f1": scores["caption_clause_f1"]}
    if model.classes:
        out["class_word"] = agreement(got, captions, model.classes)["caption_agreement"]
    return out


def captioner_recipe() -> Recipe:
    """Train a show-attend-tell captioner; `limner caption --model RUN/captioner` reads it."""
    return Recipe(config=CaptionerRunConfig, trainer=CaptionerTrainer,
                  model=lambda cfg: build(cfg.model), pipeline=None,
                  outputs=frozenset({"captioner"}))
