"""CLIP's text side, limner's own: the byte-level BPE tokenizer and the causal text transformer
(Radford et al. 2021) that Stable Diffusion 1.x (OpenAI ViT-L/14), 2.x (OpenCLIP ViT-H/14) and
SDXL read prompts with. Neither transformers nor open_clip is imported.

- Tokenizer: GPT-2's reversible byte alphabet, CLIP's lower-casing and splitting pattern, and
  the first 48,894 merges of the vocabulary OpenAI's CLIP and open_clip ship
  (plugins/weights/clip-bpe/, MIT): 49,408 tokens. A prompt becomes a 77-token window:
  <|startoftext|>, at most 75 tokens, <|endoftext|>, then padding (the end token for OpenAI's
  CLIP, "!" (id 0) for OpenCLIP's, as each checkpoint's own tokenizer pads). A longer prompt is
  cut with a notice (`long = "truncate"`, as diffusers does), split into 75-token windows
  encoded one by one and joined (`"chunks"`, as A1111 and ComfyUI do) or refused (`"refuse"`).
- Transformer: token + position embeddings, pre-norm blocks of causal self-attention and an
  MLP (quick GELU x * sigmoid(1.702 x) for OpenAI's weights, GELU for OpenCLIP's), a final
  LayerNorm; `skip = n` reads the output n blocks before the last (then the final norm), as
  "clip skip" does; the pooled vector is the end token's state, projected where the model has
  a text projection (SDXL). Parameter names follow transformers' CLIPTextModel(WithProjection),
  so a diffusers `text_encoder/` folder loads as it is.
"""
from __future__ import annotations

import functools
import gzip
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import regex
import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.attention import attention
from limner.errors import notice
from limner.protocols import TextEmbedding, check_prompts
from limner.text_cache import FrozenStaysEval, weights_from_factory

BPE = Path(__file__).parent / "weights" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the file (its vocabulary: 49,408 tokens)
START, END = "<|startoftext|>", "<|endoftext|>"
PADS = {"end": END, "!": "!"}
LONG = ("truncate", "chunks", "refuse")
# CLIP's splitting pattern: the special tokens, English contractions, runs of letters, single
# digits, runs of other non-space characters
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
SPLIT = {"end": regex.compile(PATTERN, regex.IGNORECASE),
         # a tokenizer whose padding token is "!" (SD 2's, as transformers loads it) splits every "!" off as
         # that special token: "top!!" is "top", "!", "!", never the merged "!!"
         "!": regex.compile("!|" + PATTERN, regex.IGNORECASE)}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (Radford et al. 2019):
    printable Latin-1 bytes map to themselves, the rest to code points from 256 up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


@functools.lru_cache(maxsize=2)
def _vocabulary(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(token -> id, merge pair -> rank) of a CLIP BPE file."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as exc:
        raise limner.LimnerError(f"cannot read the CLIP BPE vocabulary {path}: {exc}") from None
    merges = [tuple(line.split()) for line in lines[1:MERGES + 1]]
    if len(merges) != MERGES or any(len(m) != 2 for m in merges):
        raise limner.LimnerError(f"{path} is not a CLIP BPE vocabulary: it needs {MERGES} merge lines of two symbols")
    symbols = list(byte_alphabet().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    return {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(merges)}


class ClipTokenizer:
    """Prompts -> [B, 77 * windows] token ids (see the module's docstring)."""

    def __init__(self, pad: str = "end", long: str = "truncate", path: str | Path = BPE):
        if pad not in PADS:
            raise limner.LimnerError(f"clip: pad must be one of {', '.join(PADS)} (the end token, as OpenAI's CLIP "
                                     f"pads, or '!', as OpenCLIP's), got {pad!r}")
        if long not in LONG:
            raise limner.LimnerError(f"clip: long must be one of {', '.join(LONG)}, got {long!r}")
        self.encoder, self.ranks, self.pad_name = *_vocabulary(str(path)), pad
        self.bytes = byte_alphabet()
        self.start, self.end, self.pad = self.encoder[START], self.encoder[END], self.encoder[PADS[pad]]
        self.long, self.window, self.split = long, 77, SPLIT[pad]
        self._bpe = functools.lru_cache(maxsize=20_000)(self._merge)

    @staticmethod
    def clean(text: str) -> str:
        """The normalisation transformers' CLIPTokenizer applies (which diffusers' pipelines use):
        Unicode NFC, runs of whitespace made one space, lower case. OpenAI's original also decodes
        HTML entities and repairs mojibake with ftfy; limner matches the tool people run."""
        return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()

    def _merge(self, word: str) -> tuple[str, ...]:
        """Byte-pair merging of one word (Sennrich et al. 2016): the lowest-ranked adjacent pair
        is joined until no known pair is left; the last symbol carries the end-of-word mark."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b): self.ranks.get((a, b), 1 << 30) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=pairs.get)
            if pairs[best] == 1 << 30:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def tokens(self, text: str) -> list[int]:
        """The ids of a prompt's text, without the start and end tokens."""
        ids = []
        for piece in self.split.findall(self.clean(text)):
            if piece in (START, END) or piece == PADS[self.pad_name]:
                ids.append(self.encoder[piece])
                continue
            word = "".join(self.bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(word))
        return ids

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77 * windows] ids: each prompt in windows of <start> 75 tokens <end> padding; every
        prompt of the batch gets as many windows as the longest (1 unless long = "chunks")."""
        body = self.window - 2
        rows = [self.tokens(p) for p in prompts]
        over = [(p, len(r)) for p, r in zip(prompts, rows) if len(r) > body]
        if over and self.long == "refuse":
            raise limner.LimnerError(f"the prompt {over[0][0][:60]!r}... is {over[0][1]} CLIP tokens; this text "
                                     f"encoder reads at most {body} (long = \"refuse\"): shorten it, or set "
                                     "long = \"chunks\"")
        if over and self.long == "truncate":
            notice(f"prompts longer than CLIP's {body} tokens are cut to them (the rest is not seen; long = \"chunks\" "
                   f"reads them in windows), e.g. {over[0][0][:60]!r}...", key="prompt-truncated")
        windows = max(1, *(-(-len(r) // body) for r in rows)) if self.long == "chunks" else 1
        out = torch.full((len(rows), windows * self.window), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            for w in range(windows):
                part = r[w * body:(w + 1) * body]
                out[i, w * self.window:w * self.window + len(part) + 2] = torch.tensor([self.start, *part, self.end])
        return out


# --- the transformer (parameter names as transformers' CLIPTextModel) ----------------------------

class Embeddings(nn.Module):
    def __init__(self, vocab: int, width: int, length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(length, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in
                   (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, mask).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, hidden), nn.Linear(hidden, width), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, act: str, eps: float):
        super().__init__()
        self.self_attn, self.mlp = SelfAttention(width, heads), MLP(width, 4 * width, act)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(Block(width, heads, act, eps) for _ in range(layers))


class TextModel(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int, act: str, eps: float):
        super().__init__()
        self.embeddings = Embeddings(vocab, width, length)
        self.encoder = Encoder(width, layers, heads, act, eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: torch.Tensor, skip: int = 0, norm_skip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, D] of the block `skip` before the last, final-normed unless norm_skip is
        false; the final-normed last states, whose end-token row is the pooled vector)."""
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()[None, None]
        x = self.embeddings(ids)
        keep = None
        for i, block in enumerate(self.encoder.layers):
            x = block(x, causal)
            if i == len(self.encoder.layers) - 1 - skip:
                keep = x
        return self.final_layer_norm(keep) if norm_skip else keep, self.final_layer_norm(x)


class ClipTextEncoder(FrozenStaysEval, nn.Module):
    """encode(prompts) -> TextEmbedding: tokens [B, 77 * windows, width] (every position, padding
    included, as Stable Diffusion's UNets read them), pooled [B, width or projection]."""

    lora_part = "text_encoder"  # LoRA files address its layers by these (transformers') names

    def __init__(self, width: int, layers: int, heads: int, act: str, pad: str, skip: int, projection: int,
                 long: str, vocab: int = 49408, length: int = 77, eps: float = 1e-5, norm_skip: bool = True):
        super().__init__()
        for name, value, low in (("width", width, 1), ("layers", layers, 1), ("heads", heads, 1), ("skip", skip, 0),
                                 ("projection", projection, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise limner.LimnerError(f"clip: {name} must be a whole number >= {low}, got {value!r}")
        if width % heads:
            raise limner.LimnerError(f"clip: width ({width}) must be a multiple of heads ({heads})")
        if skip >= layers:
            raise limner.LimnerError(f"clip: skip ({skip}) must be below layers ({layers}): it counts blocks back "
                                     "from the last")
        if act not in ("quick_gelu", "gelu"):
            raise limner.LimnerError(f"clip: act must be quick_gelu (OpenAI's CLIP) or gelu (OpenCLIP), got {act!r}")
        self.tokenizer = ClipTokenizer(pad, long)
        self.text_model = TextModel(vocab, width, layers, heads, length, act, eps)
        if projection:
            self.text_projection = nn.Linear(width, projection, bias=False)
        self.skip, self.dim, self.norm_skip = skip, width, bool(norm_skip)
        self.options = dict(width=width, layers=layers, heads=heads, act=act, pad=pad, skip=skip,
                            projection=projection, long=long, norm_skip=bool(norm_skip))

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        ids = self.tokenizer(check_prompts(prompts)).to(self.device)
        b, window = ids.shape[0], self.tokenizer.window
        windows = ids.view(b * (ids.shape[1] // window), window)
        states, last = self.text_model(windows, self.skip, self.norm_skip)
        states = states.reshape(b, -1, states.shape[-1])
        ends = (windows == self.tokenizer.end).int().argmax(1)  # the first end token of each window
        pooled = last[torch.arange(len(windows)), ends].view(b, -1, last.shape[-1])[:, 0]
        if hasattr(self, "text_projection"):
            pooled = self.text_projection(pooled)
        return TextEmbedding(states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device), pooled)


def load_weights(module: nn.Module, path: str) -> None:
    """HF-layout weights (a safetensors file, or a folder holding model.safetensors) into `module`."""
    from limner.checkpoint import load_module

    file = Path(path)
    file = file / "model.safetensors" if file.is_dir() else file
    if not file.is_file():
        raise limner.LimnerError(f"clip: no weights at {path} (a .safetensors file or a folder with model.safetensors)")
    load_module(module, file)


def clip_text_transformer(width: int = 768, layers: int = 12, heads: int = 12, act: str = "quick_gelu",
                          pad: str = "end", skip: int = 0, projection: int = 0, long: str = "truncate",
                          vocab: int = 49408, freeze: bool = True, path: str | None = None,
                          norm_skip: bool = True) -> ClipTextEncoder:
    """A CLIP text transformer of any size (random weights, or `path`: transformers' layout);
    `skip` blocks before the last give the states (final-normed unless `norm_skip` is false)."""
    encoder = ClipTextEncoder(width, layers, heads, act, pad, skip, projection, long, vocab, norm_skip=norm_skip)
    if path:
        load_weights(encoder, path)
        weights_from_factory(encoder)  # its weights come from `path`, not from a checkpoint
    return encoder.requires_grad_(not freeze)


def clip_l(skip: int = 0, long: str = "truncate", freeze: bool = True, path: str | None = None) -> ClipTextEncoder:
    """OpenAI CLIP ViT-L/14's text tower: Stable Diffusion 1.x's (768 wide, 12 blocks, quick GELU)."""
    return clip_text_transformer(768, 12, 12, "quick_gelu", "end", skip, 0, long, freeze=freeze, path=path)


def openclip_h(long: str = "truncate", freeze: bool = True, path: str | None = None) -> ClipTextEncoder:
    """OpenCLIP ViT-H/14's text tower as Stable Diffusion 2.x reads it: its penultimate block's
    output, so the last of its 24 blocks is left out (1024 wide, GELU, padded with '!')."""
    return clip_text_transformer(1024, 23, 16, "gelu", "!", 0, 0, long, freeze=freeze, path=path)


class ClipPair(FrozenStaysEval, nn.Module):
    """SDXL's two text encoders (Podell et al. 2023): the per-token states of both side by side
    (CLIP ViT-L's 768 and OpenCLIP ViT-bigG's 1280: 2048 wide), the pooled (projected) vector of
    the second. With `zeros_for_empty`, the empty prompt encodes to zeros, as diffusers' SDXL
    pipelines feed guidance's unconditional branch (force_zeros_for_empty_prompt)."""

    def __init__(self, first: ClipTextEncoder, second: ClipTextEncoder, zeros_for_empty: bool):
        super().__init__()
        self.first, self.second, self.zeros_for_empty = first, second, bool(zeros_for_empty)
        self.dim = first.dim + second.dim

    def lora_parts(self) -> dict[str, nn.Module]:
        """The two encoders as LoRA files name them (diffusers' text_encoder and text_encoder_2)."""
        return {"text_encoder": self.first, "text_encoder_2": self.second}

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        a, b = self.first.encode(prompts), self.second.encode(prompts)
        if a.tokens.shape[1] != b.tokens.shape[1]:
            raise limner.LimnerError("clip_pair: the two encoders split a prompt into different numbers of 77-token "
                                     "windows; give both the same `long` setting")
        tokens, pooled = torch.cat([a.tokens, b.tokens], dim=-1), b.pooled
        if self.zeros_for_empty:
            keep = torch.tensor([bool(p) for p in prompts], device=tokens.device)
            tokens, pooled = tokens * keep[:, None, None], pooled * keep[:, None]
        return TextEmbedding(tokens, a.mask, pooled)


def clip_pair(first: dict | None = None, second: dict | None = None, zeros_for_empty: bool = True,
              freeze: bool = True) -> ClipPair:
    """Two CLIP text transformers read side by side (SDXL's; `first` and `second` are
    clip_text_transformer options, SDXL base's by default: ViT-L and ViT-bigG, both read at
    their penultimate block without the final norm, the second's pooled output projected)."""
    first = {"width": 768, "layers": 12, "heads": 12, "act": "quick_gelu", "pad": "end", "skip": 1,
             "norm_skip": False, **(first or {})}
    second = {"width": 1280, "layers": 32, "heads": 20, "act": "gelu", "pad": "!", "skip": 1, "projection": 1280,
              "norm_skip": False, **(second or {})}
    for name, options in (("first", first), ("second", second)):
        unknown = set(options) - {"width", "layers", "heads", "act", "pad", "skip", "projection", "long", "vocab",
                                  "norm_skip"}
        if unknown:
            raise limner.LimnerError(f"clip_pair: {name} has options a CLIP text transformer does not take: "
                                     f"{', '.join(sorted(unknown))}")
    return ClipPair(clip_text_transformer(**first, freeze=freeze), clip_text_transformer(**second, freeze=freeze),
                    zeros_for_empty).requires_grad_(not freeze)
