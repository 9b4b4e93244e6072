"""Frozen text encoders made cheap: per-prompt embedding caching, and pretrained weights that
stay out of checkpoints.

Training captions repeat (the single-object `shapes` grammar has 486 of them), so a frozen
encoder need run once per distinct prompt. `EmbeddingCache` keeps each prompt's token states
(trimmed to its real tokens) and pooled vector, least recently used first out, and is keyed by
the encoder's identity *and* the version counters of its weights, so loading new weights
empties it. It never serves an encoder with a trainable weight: then every call runs it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from .errors import LimnerError
from .protocols import TextEmbedding
from .words import split_clauses


def is_frozen(encoder: nn.Module) -> bool:
    """True when no weight of `encoder` is trained (it has some, and none requires grad)."""
    params = list(encoder.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


class EmbeddingCache:
    """encode(encoder, prompts) with the embeddings of prompts seen before reused."""

    def __init__(self, max_prompts: int = 8192):
        if max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
        self.max_prompts = max_prompts
        self.rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.key: tuple | None = None
        self.hits = self.misses = 0

    def clear(self) -> None:
        """Forget every embedding (the encoder changed in a way its weights do not show: a LoRA hook)."""
        self.rows.clear()
        self.key = None

    def __deepcopy__(self, memo):  # a copied model (EMA) starts with its own, empty cache
        return EmbeddingCache(self.max_prompts)

    def _identity(self, encoder: nn.Module) -> tuple:
        first = next(encoder.parameters())
        return (id(encoder), first.device, first.dtype, tuple(p._version for p in encoder.parameters()))

    def encode(self, encoder: nn.Module, prompts: Sequence[str]) -> TextEmbedding:
        if not is_frozen(encoder) or isinstance(prompts, str):
            return encoder.encode(prompts)  # trained (or bad input, which the encoder reports)
        identity = self._identity(encoder)
        if identity != self.key:
            self.rows.clear()
            self.key = identity
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            with torch.no_grad():
                emb = encoder.encode(missing)
            for i, prompt in enumerate(missing):
                real = emb.mask[i].nonzero()
                length = int(real.max()) + 1 if len(real) else 0
                self.rows[prompt] = (emb.tokens[i, :length].detach(), emb.pooled[i].detach())
        for prompt in prompts:
            self.rows.move_to_end(prompt)
        rows = [self.rows[p] for p in prompts]
        while len(self.rows) > self.max_prompts:
            self.rows.popitem(last=False)
        return _stack(rows)


def _stack(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> TextEmbedding:
    """Per-prompt (tokens [L_i, D], pooled [D]) as one batch, padded with masked zeros."""
    length = max(max(t.shape[0] for t, _ in rows), 1)
    first = rows[0][0]
    tokens = first.new_zeros((len(rows), length, first.shape[-1]))
    mask = torch.zeros((len(rows), length), dtype=torch.bool, device=first.device)
    for i, (t, _) in enumerate(rows):
        tokens[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return TextEmbedding(tokens, mask, torch.stack([p for _, p in rows]))


def weights_from_factory(module: nn.Module) -> None:
    """Keep a frozen pretrained module's weights out of its parents' state dicts: they come
    from the module's own source (a weights package) whenever it is built, so a checkpoint
    holds only what was trained. Loading fills the absent keys from the module as built."""

    reading = False  # while fill() reads a module's own weights (deep copies share these hooks)

    def drop(mod, state_dict, prefix, local_metadata):
        if is_frozen(mod) and not reading:
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
        return state_dict

    def fill(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        nonlocal reading
        if is_frozen(mod) and not any(k.startswith(prefix) for k in state_dict):
            reading = True
            try:
                state_dict.update(mod.state_dict(prefix=prefix))
            finally:
                reading = False

    module._register_state_dict_hook(drop)
    module._register_load_state_dict_pre_hook(fill, with_module=True)


class FrozenStaysEval:
    """Mixin for an nn.Module text encoder: while frozen it stays in eval mode (no dropout)
    even when the model around it is put in training mode."""

    def train(self, mode: bool = True):
        return super().train(mode and not is_frozen(self))




def with_phrase_tokens(encode: Callable[[list[str]], TextEmbedding], prompts: Sequence[str],
                       whole: bool = True) -> TextEmbedding:
    """Token states clause by clause: each clause of a prompt encoded alone, its pooled vector
    added to each of its tokens, the clauses' tokens concatenated (the prompt's own pooled
    vector is kept for the per-sample conditioning). `whole = False` when nothing reads that
    pooled vector (the denoiser's `reads_pooled`): the whole prompts are then not encoded at all
    and their pooled vectors are zeros (two-object prompts are too many to cache, so encoding
    them costs a large language model's forward every step).

    Why: in "a red circle at the top left and a blue square at the bottom" encoded whole,
    "red" and "top left" sit in different tokens, both contextualised by both objects, so a
    pixel's cross-attention query - which finds its place by the place words - reads no colour
    there: binding needs a second hop. Encoded alone, a clause's tokens know only their own
    object, and its pooled vector (where colour and shape dominate) rides on every one of them,
    place words included: one lookup by place returns what to draw there. (Measured: a pooled
    clause vector alone, appended as one extra token, was ignored by the UNet - its norm is 0.6x
    a token's and top-left vs bottom-left differ by cosine 0.976.) Encoding noun phrases
    separately for attribute binding follows Structured Diffusion Guidance (Feng et al., ICLR 2023)."""
    parts = [split_clauses(p) for p in prompts]
    unique = list(dict.fromkeys(q for ps in parts for q in ps))
    clauses = encode(unique)
    if clauses.pooled.shape[-1] != clauses.tokens.shape[-1]:
        raise LimnerError(f"phrase tokens need an encoder whose pooled vector is as wide as its tokens, got "
                          f"{clauses.pooled.shape[-1]} and {clauses.tokens.shape[-1]}: turn phrase_tokens off for "
                          "this encoder")
    dtype = clauses.tokens.dtype
    whole_pooled = (encode(list(prompts)).pooled if whole
                    else clauses.pooled.new_zeros((len(prompts), clauses.pooled.shape[-1]), dtype=dtype))
    index = {q: i for i, q in enumerate(unique)}
    rows = [(torch.cat([clauses.tokens[index[q], clauses.mask[index[q]]] + clauses.pooled[index[q]] for q in ps])
             .to(dtype), pooled) for ps, pooled in zip(parts, whole_pooled)]
    per_clause = clauses.pooled.to(dtype)
    by_clause = _stack([(per_clause[[index[q] for q in ps]], pooled) for ps, pooled in zip(parts, whole_pooled)])
    return replace(_stack(rows), clauses=by_clause.tokens, clause_mask=by_clause.mask)
