"""Attention implementations the dispatcher chooses between: q, k, v [B, H, L, Dh], an
optional boolean mask broadcastable to [B, H, Lq, Lk] (True = attend).

attention_triton is our own FlashAttention forward (Dao et al. 2022): one program owns a
block of queries of one (batch, head), streams key/value blocks and keeps the softmax
online (running max and sum, Milakov & Gimelshein 2018), so the Lq x Lk scores never reach
memory. The mask is read through its broadcast strides (a [B, 1, 1, Lk] key mask costs
nothing extra). Its backward recomputes through attention_math: the Triton path is for
sampling; training picks sdpa.
"""
import torch
import torch.nn.functional as F

from ._backend import interpreting, resolve, tl, triton


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in plain PyTorch, accumulated in float32 (Vaswani et al. 2017)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


# torch's CPU flash kernel is about twice as slow with fewer than 16 keys as with 16
# (benchmarks/results/cpu-kernel-measurements.md).
# Text prompts are that short (the demo's are 8-12 tokens), so on the CPU the keys are
# padded to CPU_MIN_KEYS with masked-out zeros: a masked key's weight is exp(-inf) = 0, the result
# is the same attention (to float rounding), and gradients flow back through the pad's slice.
CPU_MIN_KEYS = 16


def pad_keys(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v [B, H, Lk, Dh] and the mask (True = attend, made if None; a float mask is an additive
    bias and gets -inf) padded to `keys` keys that no query attends to."""
    short = keys - k.shape[-2]
    k, v = (F.pad(t, (0, 0, 0, short)) for t in (k, v))
    if mask is None:
        mask = torch.ones(1, 1, 1, keys - short, dtype=torch.bool, device=k.device)
    mask = mask.expand(*mask.shape[:-1], keys - short)
    return k, v, F.pad(mask, (0, short), value=False if mask.dtype == torch.bool else float("-inf"))


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention (flash / memory-efficient / math, chosen by torch);
    on the CPU, fewer than CPU_MIN_KEYS keys are padded with masked-out ones (see CPU_MIN_KEYS)."""
    if q.device.type == "cpu" and 0 < k.shape[-2] < CPU_MIN_KEYS:
        k, v, mask = pad_keys(k, v, mask, CPU_MIN_KEYS)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


if triton is not None:
    @triton.jit
    def _flash_forward(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, H, LQ, LK, DH, scale,
                       sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_q, sm_k,
                       HAS_MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        bh, start = tl.program_id(0), tl.program_id(1) * BLOCK_M  # B*H on axis 0: axis 1 is capped at 65535
        b, h = bh // H, bh % H
        rows, cols, dims = start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
        row_ok, dim_ok = rows < LQ, dims < DH
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, LK, BLOCK_N):
            keys = n0 + cols
            key_ok = keys < LK
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + b * sk_b + h * sk_h + keys[:, None] * sk_l + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + keys[:, None] * sv_l + dims[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            ok = row_ok[:, None] & key_ok[None, :]
            if HAS_MASK:
                allowed = tl.load(m_ptr + b * sm_b + h * sm_h + rows[:, None] * sm_q + keys[None, :] * sm_k,
                                  mask=ok, other=0)
                ok = ok & (allowed != 0)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that may attend nothing gives 0
        tl.store(o_ptr + bh.to(tl.int64) * LQ * DH + rows[:, None] * DH + dims[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _flash(q, k, v, mask):
    b, h, lq, dh = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, h, lq, dh, device=q.device, dtype=q.dtype)
    m = mask.expand(b, h, lq, k.shape[2]) if mask is not None else None
    m_strides = m.stride() if m is not None else (0, 0, 0, 0)
    m = m.view(torch.uint8) if m is not None else q
    block = 16 if interpreting() else 64  # the interpreter runs each block as a Python step
    grid = (b * h, triton.cdiv(lq, block))
    # NOTE: float32 runs its dots in IEEE float32 (not TF32) to match the reference; triton 3.9's
    # interpreter multiplies bfloat16 dots wrongly (2.5e10 off on a 16x16 product), so there too
    ieee = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)
    _flash_forward[grid](q, k, v, m, out, h, lq, k.shape[2], dh, dh ** -0.5, *q.stride()[:3], *k.stride()[:3],
                         *v.stride()[:3], *m_strides, HAS_MASK=mask is not None, IEEE=ieee,
                         BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(dh)))
    return out


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask):
        ctx.save_for_backward(q, k, v, mask)
        return _flash(q, k, v, mask)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
            out = attention_math(*inputs, mask)
            grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dout)
        it = iter(grads)
        return (*(next(it) if need else None for need in ctx.needs_input_grad[:3]), None)


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Our FlashAttention forward; see the module docstring."""
    if resolve("attention_triton", "triton", q) == "eager":  # LIMNER_KERNELS=eager: the reference everywhere
        return attention_math(q, k, v, mask)
    if q.shape[-1] > 256:
        raise ValueError(f"attention_triton: head dim {q.shape[-1]} is over 256; use the sdpa backend")
    return FlashAttention.apply(q, k, v, mask)
