"""Denoiser networks: an ADM-style UNet and a DiT, both cross-attending to text tokens.

Each factory returns a Preconditioned module, D(x, sigma, cond) in the Karras/EDM convention,
with cond a TextEmbedding (or None). `context_dim`, `in_channels` and `image_size` are set
by the trainer from the text encoder and dataset.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import limner
from limner.config import check_range
from limner.diffusion import Preconditioned
from limner.kernels import adaln_modulate, gated_residual, group_norm_silu
from limner.nn import Attention, ContextRefiner, FeedForward, noise_embedding, zero_init
from limner.protocols import TextEmbedding


class Conditioning(nn.Module):
    """The per-sample vector every block sees: noise-level features + pooled text (unless
    `pooled` is off: then text reaches the network through cross-attention alone)."""

    def __init__(self, base: int, dim: int, context_dim: int, pooled: bool = True):
        super().__init__()
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = nn.Linear(context_dim, dim) if pooled else None

    @property
    def reads_pooled(self) -> bool:
        """False with pooled = false (the Denoiser protocol's attribute)."""
        return self.text is not None

    def forward(self, c_noise: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        emb = self.time(noise_embedding(c_noise, self.base))
        return emb if cond is None or self.text is None else emb + self.text(cond.pooled.to(emb.dtype))


def _context(cond: TextEmbedding | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if cond is None else (cond.tokens, cond.mask)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [side*side, dim] (MAE, He et al. 2022)."""
    quarter = dim // 4
    freqs = 1 / 10_000 ** (torch.arange(quarter) / quarter)
    pos = torch.arange(side).float()[:, None] * freqs[None]  # [side, quarter]
    row = torch.cat([pos.sin(), pos.cos()], 1)
    grid_y, grid_x = row[:, None].expand(side, side, -1), row[None].expand(side, side, -1)
    return rearrange(torch.cat([grid_y, grid_x], -1), "h w d -> (h w) d")


def _refiner_heads(dim: int) -> int:
    """Heads of 64 channels where the width allows (MiniLM's 384: 6), else one."""
    return dim // 64 if dim % 64 == 0 else 1


class ClauseLayout(nn.Module):
    """Each clause of the prompt claims a region: a [B, dim, side, side] map whose every pixel
    holds a mix of clause vectors, weighted by how well the pixel's place matches the clause.

    Why: with two objects, cross-attention must find a pixel's place among the tokens and read
    colour and shape from another token of the same clause; the query that does it is built
    from noisy image features, and the place route was not learned in 4,000 steps
    (benchmarks/results/cpu-two-object.md). Here the query is the pixel's place alone (learned
    from fixed sine-cosine features) and each key and value is one clause's pooled vector, so
    "where does this clause go" is one lookup that never sees the image, and what is drawn at a
    pixel is the clause that owns it. A learned null clause takes pixels no clause claims (the
    background). Clause vectors come from `model.phrase_tokens` (TextEmbedding.clauses).
    Spatial conditioning from per-object text follows GLIGEN (Li et al. 2023), which is given
    the boxes; here the places are read from the text."""

    def __init__(self, context_dim: int, dim: int, side: int, key_dim: int = 64):
        super().__init__()
        self.side, self.scale = side, key_dim**-0.5
        self.register_buffer("pos", sincos_2d(key_dim, side), persistent=False)  # [P, key_dim]
        self.query = nn.Sequential(nn.Linear(key_dim, key_dim), nn.SiLU(), nn.Linear(key_dim, key_dim))
        self.norm = nn.LayerNorm(context_dim)
        self.key, self.value = nn.Linear(context_dim, key_dim), nn.Linear(context_dim, dim)
        self.null_key, self.null_value = nn.Parameter(torch.zeros(key_dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, cond: TextEmbedding) -> torch.Tensor:
        if cond.clauses is None:
            raise limner.LimnerError("clause_layout reads one vector per clause of the prompt: set "
                                     "model.phrase_tokens = true (or turn clause_layout off)")
        clauses = self.norm(cond.clauses)  # [B, K, D]
        b = clauses.shape[0]
        keys = torch.cat([self.null_key.expand(b, 1, -1), self.key(clauses)], 1)  # [B, 1+K, key_dim]
        values = torch.cat([self.null_value.expand(b, 1, -1), self.value(clauses)], 1)  # [B, 1+K, dim]
        logits = torch.einsum("pd,bkd->bpk", self.query(self.pos), keys) * self.scale
        real = F.pad(cond.clause_mask, (1, 0), value=True)[:, None]  # the null clause is always there
        weights = logits.masked_fill(~real, float("-inf")).softmax(-1)  # [B, P, 1+K]
        return rearrange(weights @ values, "b (h w) c -> b c h w", h=self.side)


# --- UNet -------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding as a per-channel scale and shift (ADM);
    with a clause layout, its map (projected) is added after the first conv."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float, layout_dim: int = 0):
        super().__init__()
        self.groups = groups
        self.layout = zero_init(nn.Conv2d(layout_dim, cout, 1)) if layout_dim else None
        self.norm1, self.norm2 = nn.GroupNorm(groups, cin), nn.GroupNorm(groups, cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, layout: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        h = self.conv1(group_norm_silu(x, self.groups, self.norm1.weight, self.norm1.bias))
        if self.layout is not None and layout is not None:  # the clause map at this resolution
            h = h + self.layout(layout[h.shape[-1]])
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)
        h = group_norm_silu(h, self.groups, self.norm2.weight, self.norm2.bias, scale=scale, shift=shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class SpatialTransformer(nn.Module):
    """Self-attention over pixels, cross-attention to text tokens, feed-forward (LDM).

    With `positions`, fixed 2-D sine-cosine features of each pixel's place are added to its
    token, so a query knows where it is and "at the top left" can land at the top left:
    without them, cross-attention is translation-invariant and placement falls to chance.
    """

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, side: int, positions: bool = True):
        super().__init__()
        if positions and ch % 4:
            raise limner.LimnerError(f"unet: positions need channels divisible by 4, got {ch}")
        self.register_buffer("pos", sincos_2d(ch, side) if positions else None, persistent=False)
        self.norm = nn.GroupNorm(groups, ch)
        self.proj_in, self.proj_out = nn.Conv2d(ch, ch, 1), zero_init(nn.Conv2d(ch, ch, 1))
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(ch), nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.self_attn, self.cross_attn = Attention(ch, heads), Attention(ch, heads, context_dim)
        self.ff = FeedForward(ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        h = x.shape[2]
        t = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        if self.pos is not None:
            if self.pos.shape[0] != t.shape[1]:
                raise limner.LimnerError(f"unet: built for {self.pos.shape[0]} positions at this level, got an "
                                         f"image of {tuple(x.shape[2:])}: sample at the model's image_size")
            t = t + self.pos.to(t.dtype)
        t = t + self.self_attn(self.ln1(t))
        context, mask = _context(cond)
        if context is not None:
            t = t + self.cross_attn(self.ln2(t), context.to(t.dtype), mask)
        t = t + self.ff(self.ln3(t))
        return x + self.proj_out(rearrange(t, "b (h w) c -> b c h w", h=h))


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb, cond):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb, cond):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Sequential):
    """A list of blocks called with (x, emb, cond, layout); ResBlocks read the layout maps
    ({side: map}) instead of cond."""

    def forward(self, x, emb, cond, layout=None):
        for block in self:
            x = block(x, emb, layout) if isinstance(block, ResBlock) else block(x, emb, cond)
        return x


class UNet(nn.Module):
    """ADM-style UNet (Dhariwal & Nichol 2021) with LDM cross-attention (Rombach et al. 2022)."""

    lora_part = "unet"  # LoRA files (diffusers/PEFT layout, unet.<its names>) address its layers

    @property
    def reads_pooled(self) -> bool:  # the Denoiser protocol's attribute: False with pooled = false
        return self.cond.reads_pooled

    def __init__(self, in_channels: int, channels: int, mults: tuple[int, ...], blocks: int,
                 attention_levels: tuple[int, ...], heads: int, context_dim: int, groups: int, dropout: float,
                 image_size: int, positions: bool, context_layers: int = 0, pooled: bool = True,
                 clause_layout: bool = False):
        super().__init__()
        emb_dim = 4 * channels
        layout_dim = channels if clause_layout else 0
        self.layout = ClauseLayout(context_dim, layout_dim, image_size) if clause_layout else None
        self.levels = len(mults)
        self.refiner = (
            ContextRefiner(context_dim, context_layers, _refiner_heads(context_dim)) if context_layers else None
        )
        self.cond = Conditioning(channels, emb_dim, context_dim, pooled)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, groups, dropout, layout_dim)

        def attn(ch, level):
            return SpatialTransformer(ch, heads, context_dim, groups, image_size // 2**level, positions)

        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(mults):
            for _ in range(blocks):
                layers = [res(ch, channels * mult)] + (
                    [attn(channels * mult, level)] if level in attention_levels else []
                )
                ch = channels * mult
                self.down.append(Stage(*layers))
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(Stage(Down(ch)))
                skips.append(ch)
        self.middle = Stage(res(ch, ch), attn(ch, len(mults) - 1), res(ch, ch))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(blocks + 1):
                layers = [res(ch + skips.pop(), channels * mult)]
                ch = channels * mult
                layers += [attn(ch, level)] if level in attention_levels else []
                layers += [Up(ch)] if level > 0 and i == blocks else []
                self.up.append(Stage(*layers))
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))
        self.groups = groups

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        emb = self.cond(c_noise, cond)
        if cond is not None and self.refiner is not None:
            cond = replace(cond, tokens=self.refiner(cond.tokens.to(x.dtype), cond.mask))
        layout = None
        if self.layout is not None and cond is not None:  # the clause map at every level's resolution
            full = self.layout(cond).to(x.dtype)
            layout = {full.shape[-1] >> k: F.avg_pool2d(full, 2**k) if k else full for k in range(self.levels)}
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, cond, layout)
            skips.append(h)
        h = self.middle(h, emb, cond, layout)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, cond, layout)
        return self.conv_out(group_norm_silu(h, self.groups, self.norm_out.weight, self.norm_out.bias))


def unet(context_dim: int, in_channels: int = 3, image_size: int = 32, channels: int = 64,
         mults: list[int] = (1, 2, 2), blocks: int = 2, attention_levels: list[int] = (1, 2), heads: int = 4,
         groups: int = 32, dropout: float = 0.0, positions: bool = True, context_layers: int = 0,
         pooled: bool = True, clause_layout: bool = False, parameterization: str = "edm", sigma_data: float = 0.5):
    """ADM-style UNet with text cross-attention (Dhariwal & Nichol 2021; Rombach et al. 2022);
    `positions` adds 2-D sine-cosine position features to its attention tokens, `context_layers`
    trainable transformer layers refine the text tokens first; `pooled = false` keeps the pooled
    text vector out of the per-sample scale/shift (a vector for the whole image blends the
    colours of several objects: with it off, text arrives through cross-attention only);
    `clause_layout` lets each clause of the prompt claim a region of every ResBlock (ClauseLayout;
    needs model.phrase_tokens)."""
    for name, value in dict(channels=channels, blocks=blocks, heads=heads, groups=groups).items():
        check_range(value, f"unet: {name}", ge=1)
    check_range(dropout, "unet: dropout", ge=0, lt=1)
    if not mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
        raise limner.LimnerError(f"unet: mults must list one whole number >= 1 per level, got {list(mults)}")
    if any(not 0 <= level < len(mults) for level in attention_levels):
        raise limner.LimnerError(f"unet: attention_levels must be levels 0..{len(mults) - 1}, got "
                                 f"{list(attention_levels)}")
    if context_layers < 0:
        raise limner.LimnerError(f"unet: context_layers must be >= 0, got {context_layers}")
    if image_size % 2 ** (len(mults) - 1):
        raise limner.LimnerError(f"unet: image_size {image_size} must be divisible by 2^{len(mults) - 1}")
    if channels % groups:
        raise limner.LimnerError(f"unet: channels {channels} must be divisible by groups {groups}")
    net = UNet(in_channels, channels, tuple(mults), blocks, tuple(attention_levels), heads, context_dim, groups,
               dropout, image_size, positions, context_layers, pooled, clause_layout)
    return Preconditioned(net, parameterization, sigma_data)


# --- DiT --------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    """adaLN-zero self-attention and MLP (Peebles & Xie 2023), plus cross-attention to the
    text tokens between them (PixArt-alpha, Chen et al. 2023)."""

    def __init__(self, dim: int, heads: int, context_dim: int, clause_layout: bool = False):
        super().__init__()
        self.layout = zero_init(nn.Linear(dim, dim)) if clause_layout else None
        self.self_attn, self.cross_attn = Attention(dim, heads), Attention(dim, heads, context_dim)
        self.ln_cross = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.ada = zero_init(nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: TextEmbedding | None,
                layout: torch.Tensor | None = None) -> torch.Tensor:
        if layout is not None:  # [B, N, dim]: the clause map at each patch
            x = x + self.layout(layout)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(emb)).chunk(6, dim=1)
        x = gated_residual(x, gate1, self.self_attn(adaln_modulate(x, shift1, scale1)))
        context, mask = _context(cond)
        if context is not None:
            x = x + self.cross_attn(self.ln_cross(x), context.to(x.dtype), mask)
        return gated_residual(x, gate2, self.ff(adaln_modulate(x, shift2, scale2)))


class DiT(nn.Module):
    """Diffusion transformer over image patches (Peebles & Xie 2023)."""

    lora_part = "unet"  # the denoiser's part, as LoRA files name it whatever the network

    @property
    def reads_pooled(self) -> bool:  # the Denoiser protocol's attribute: False with pooled = false
        return self.cond.reads_pooled

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int, depth: int, heads: int,
                 context_dim: int, pooled: bool = True, clause_layout: bool = False):
        super().__init__()
        self.patch, self.side = patch, image_size // patch
        self.cond = Conditioning(dim, dim, context_dim, pooled)
        self.layout = ClauseLayout(context_dim, dim, self.side) if clause_layout else None
        self.patchify = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(dim, self.side), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, context_dim, clause_layout) for _ in range(depth))
        self.final_ada = zero_init(nn.Linear(dim, 2 * dim))
        self.final = zero_init(nn.Linear(dim, patch * patch * in_channels))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        emb = self.cond(c_noise, cond)
        t = rearrange(self.patchify(x), "b d h w -> b (h w) d") + self.pos.to(x.dtype)
        layout = None
        if self.layout is not None and cond is not None:
            layout = rearrange(self.layout(cond).to(x.dtype), "b d h w -> b (h w) d")
        for block in self.blocks:
            t = block(t, emb, cond, layout)
        shift, scale = self.final_ada(F.silu(emb)).chunk(2, dim=1)
        t = self.final(adaln_modulate(t, shift, scale))
        return rearrange(t, "b (h w) (p q c) -> b c (h p) (w q)", h=self.side, p=self.patch, q=self.patch)


def dit(context_dim: int, in_channels: int = 3, image_size: int = 32, patch: int = 2, dim: int = 256,
        depth: int = 6, heads: int = 4, pooled: bool = True, clause_layout: bool = False,
        parameterization: str = "edm", sigma_data: float = 0.5):
    """DiT with adaLN-zero and text cross-attention (Peebles & Xie 2023; Chen et al. 2023);
    `pooled = false`: text through cross-attention only, and `clause_layout`, as the unet's."""
    for name, value in dict(patch=patch, dim=dim, depth=depth, heads=heads).items():
        check_range(value, f"dit: {name}", ge=1)
    if image_size % patch:
        raise limner.LimnerError(f"dit: image_size {image_size} must be divisible by patch {patch}")
    if dim % heads:
        raise limner.LimnerError(f"dit: dim {dim} must be divisible by heads {heads}")
    if dim % 4:
        raise limner.LimnerError(f"dit: dim {dim} must be divisible by 4")
    net = DiT(in_channels, image_size, patch, dim, depth, heads, context_dim, pooled, clause_layout)
    return Preconditioned(net, parameterization, sigma_data)
