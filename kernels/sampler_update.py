"""The sampler update fused with the classifier-free-guidance combine.

Euler (Karras et al. 2022, Alg. 1), DDIM (Song, Meng & Ermon 2021, in sigma form) and
DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) all take a step of the form

    D  = D_uncond + w * (D_cond - D_uncond)          (Ho & Salimans 2022)
    x' = a * x + b * D + e * D_old + c * noise

with per-step scalars a, b, e, c (see limner.sampling.step_coefficients). Eager, that is
six to nine elementwise passes with as many temporaries; fused, one pass reads x, D_cond,
D_uncond (and D_old, noise) and writes x' and D (D is the sampler's callback value and the
next step's D_old). Sampling runs without gradients, so there is no backward.
"""
import torch

from ._backend import resolve, tl, triton, wants_grad


def guided_update_reference(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                            guidance: float = 1.0, a: float = 1.0, b: float = 0.0, old: torch.Tensor | None = None,
                            e: float = 0.0, noise: torch.Tensor | None = None,
                            c: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', D): D = uncond + guidance * (cond - uncond) (cond alone if uncond is None),
    x' = a x + b D + e old + c noise."""
    denoised = cond if uncond is None else uncond + guidance * (cond - uncond)
    x_next = a * x + b * denoised
    if old is not None and e != 0:
        x_next = x_next + e * old
    if noise is not None and c != 0:
        x_next = x_next + c * noise
    return x_next, denoised


if triton is not None:
    @triton.jit
    def _guided_update(x_ptr, cond_ptr, uncond_ptr, old_ptr, noise_ptr, out_ptr, den_ptr, total,
                       guidance, a, b, e, c, HAS_UNCOND: tl.constexpr, HAS_OLD: tl.constexpr,
                       HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        den = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            uncond = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            den = uncond + guidance * (den - uncond)
        out = a * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b * den
        if HAS_OLD:
            out += e * tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:
            out += c * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(den_ptr + offs, den.to(den_ptr.dtype.element_ty), mask=mask)


_BLOCK = 2048


def guided_update(x, cond, uncond=None, guidance=1.0, a=1.0, b=0.0, old=None, e=0.0, noise=None, c=0.0,
                  backend="auto"):
    """Fused CFG combine + sampler update; see guided_update_reference for the semantics."""
    for name, t in (("cond", cond), ("uncond", uncond), ("old", old), ("noise", noise)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"guided_update: {name} of shape {tuple(t.shape)} differs from x {tuple(x.shape)}")
    tensors = [t for t in (x, cond, uncond, old, noise) if t is not None]
    if (resolve("guided_update", backend, x) == "eager" or x.numel() == 0
            or wants_grad(*tensors)):
        return guided_update_reference(x, cond, uncond, guidance, a, b, old, e, noise, c)
    has_old, has_noise = old is not None and e != 0, noise is not None and c != 0
    x, cond = x.contiguous(), cond.contiguous()
    out, den = torch.empty_like(x), torch.empty_like(cond)
    _guided_update[(triton.cdiv(x.numel(), _BLOCK),)](
        x, cond, cond if uncond is None else uncond.contiguous(), old.contiguous() if has_old else x,
        noise.contiguous() if has_noise else x, out, den, x.numel(), float(guidance), float(a), float(b),
        float(e), float(c), HAS_UNCOND=uncond is not None, HAS_OLD=has_old, HAS_NOISE=has_noise, BLOCK=_BLOCK)
    return out, den
