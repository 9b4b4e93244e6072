"""What a component of each kind must look like once its factory has built it.

These are typing Protocols: a plugin needs no base class, only the call signature.
Images are NCHW float tensors in [-1, 1]; randomness comes from an explicit generator, or a
list of them, one per batch item (draw through `limner.sampling.randn_like`, which takes both).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import LimnerError, notice


@dataclass
class TextEmbedding:
    """A batch of encoded prompts: per-token states, their padding mask, one pooled vector;
    with phrase tokens also one pooled vector per clause of each prompt (`clauses`, padded,
    `clause_mask` True where a clause is real)."""

    tokens: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L], True where a token is real
    pooled: torch.Tensor  # [B, D]
    clauses: torch.Tensor | None = None  # [B, K, D]
    clause_mask: torch.Tensor | None = None  # [B, K]

    def __post_init__(self) -> None:
        b, length, _ = self.tokens.shape
        if tuple(self.mask.shape) != (b, length) or self.pooled.shape[0] != b:
            raise ValueError(f"TextEmbedding shapes disagree: tokens {tuple(self.tokens.shape)}, "
                             f"mask {tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}")
        if (self.clauses is None) != (self.clause_mask is None) or (
                self.clauses is not None and (self.clauses.ndim != 3 or self.clauses.shape[0] != b
                                              or tuple(self.clause_mask.shape) != self.clauses.shape[:2])):
            raise ValueError("TextEmbedding clauses [B, K, D] and clause_mask [B, K] come together and match the "
                             f"batch of {b}")

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.tokens, self.mask, self.pooled, self.clauses, self.clause_mask

    def cat(self, other: TextEmbedding) -> TextEmbedding:
        """Both batches in one, token (and clause) axes padded to the longer (padding masked out)."""
        if (self.clauses is None) != (other.clauses is None):
            raise ValueError("cannot batch a TextEmbedding with clauses and one without")

        def joined(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            """[B1, L1, ...] and [B2, L2, ...] as [B1 + B2, max(L1, L2), ...], zero-padded."""
            if a is None:
                return None
            length = max(a.shape[1], b.shape[1])
            return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1]))
                              for t in (a, b)])

        return TextEmbedding(joined(self.tokens, other.tokens), joined(self.mask, other.mask),
                             torch.cat([self.pooled, other.pooled]), joined(self.clauses, other.clauses),
                             joined(self.clause_mask, other.clause_mask))

    def detach(self) -> TextEmbedding:
        """The same embedding cut from its autograd graph."""
        return TextEmbedding(*(None if t is None else t.detach() for t in self._fields()))

    def repeat(self, n: int) -> TextEmbedding:
        """Each prompt n times in a row (for several images per prompt)."""
        return TextEmbedding(*(None if t is None else t.repeat_interleave(n, dim=0) for t in self._fields()))

    def roll(self, shifts: int) -> TextEmbedding:
        """The batch's prompts rotated by `shifts` (each image paired with another's text)."""
        return TextEmbedding(*(None if t is None else t.roll(shifts, dims=0) for t in self._fields()))


@dataclass
class WithImage:
    """A conditioning plus image channels a denoiser reads beside its input (a Preconditioned
    denoiser built with `concat` channels joins them after the input scaling): Stable Diffusion's
    inpainting UNets read the mask and the masked image's latents this way (Rombach et al. 2022)."""

    cond: Any
    image: torch.Tensor  # [B, C, H, W], the latent's height and width


@runtime_checkable
class TextEncoder(Protocol):
    def encode(self, prompts: Sequence[str]) -> TextEmbedding: ...


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts a text encoder's encode() takes (a non-empty list of strings), or a LimnerError."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise LimnerError(f"encode() takes a list of strings, got {type(prompts).__name__}: {prompts!r:.80}")
    if len(prompts) == 0:
        raise LimnerError("encode() got an empty list of prompts")
    return list(prompts)


def check_layers(layers: Sequence[int], n: int) -> None:
    """The layer numbers a text encoder's token_states() takes (0: the embeddings, up to its `n`
    layers), or a LimnerError naming the bad one."""
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise LimnerError(f"layer must be a layer number 0..{n}, got {layer!r}")


def prompt_truncated(prompt: str, limit: int, unit: str) -> None:
    """Say once that prompts are cut to the text encoder's length."""
    notice(f"prompts longer than the text encoder's {limit} {unit} are cut to it (the rest is not seen), "
           f"e.g. {prompt[:60]!r}...", key="prompt-truncated")


@runtime_checkable
class Denoiser(Protocol):
    """Karras/EDM convention: the x0 estimate for x = x0 + sigma * eps. One that never reads
    a TextEmbedding's pooled vector may say so (`reads_pooled = False`), so that its recipe
    need not compute it; without the attribute it is taken to read it."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


@runtime_checkable
class Autoencoder(Protocol):
    """Latent diffusion's image <-> latent map: images in [-1, 1], latents scaled (and shifted) to
    about unit variance, as the denoiser sees them; latent_shape(channels, size) -> [C, H, W]."""

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, channels: int, size: int) -> tuple[int, int, int]: ...


@dataclass
class Found:
    """What a family recognised in a path: its name ("sd1", ...), the form ("single file",
    "diffusers folder") and facts worth showing (`limner inspect`): prediction type, parameters
    per part, dtype, size."""

    family: str
    form: str
    facts: dict[str, Any]


@runtime_checkable
class Family(Protocol):
    """A family of checkpoints limner did not write: detect(path) says whether a file or folder
    is one (reading keys and shapes, never the whole file), load(path, **options) gives the run
    config (a dict a recipe's schema reads, with `recipe`) and the state dict of that recipe's
    model; options: `prediction` ("eps" or "v") where the file does not say."""

    def detect(self, path: Path) -> Found | None: ...

    def load(self, path: Path, **options: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...


@runtime_checkable
class Sampler(Protocol):
    def __call__(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
                 callback: Any = None, generator: torch.Generator | None = None) -> torch.Tensor: ...


@runtime_checkable
class Schedule(Protocol):
    def __call__(self, n: int, sigma_min: float, sigma_max: float, *, device: Any = None) -> torch.Tensor: ...


@runtime_checkable
class Generator(Protocol):
    def __call__(self, z: torch.Tensor, cond: Any) -> torch.Tensor: ...


@runtime_checkable
class Discriminator(Protocol):
    def __call__(self, image: torch.Tensor, cond: Any) -> torch.Tensor: ...


@runtime_checkable
class AttentionBackend(Protocol):
    """q, k, v: [B, heads, L, head_dim]; mask broadcastable to [B, heads, Lq, Lk], True = keep."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class AdversarialLoss(Protocol):
    """A GAN objective from logits: D minimises d_real + d_fake, G minimises g."""

    def d_real(self, logits: torch.Tensor) -> torch.Tensor: ...

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor: ...

    def g(self, logits: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Penalty(Protocol):
    """An extra discriminator term, run every `interval` steps and scaled by it (lazy
    regularisation, StyleGAN2 sec. 3.1); `fake` is detached, `cond` the batch's prompts."""

    interval: int

    def __call__(self, discriminator: Any, real: torch.Tensor, fake: torch.Tensor, cond: Any,
                 adversarial: AdversarialLoss) -> torch.Tensor: ...


# What a component of each kind must have; limner.create checks what a factory built against it
# (a runtime_checkable Protocol checks that the methods exist, not their signatures).
KIND_PROTOCOLS: dict[str, type] = {
    "text_encoders": TextEncoder, "denoisers": Denoiser, "autoencoders": Autoencoder, "samplers": Sampler,
    "schedules": Schedule, "generators": Generator, "discriminators": Discriminator,
    "attention_backends": AttentionBackend, "families": Family,
}
