"""Upsample, FIR-filter, downsample: `upfirdn2d` with the semantics of StyleGAN2-ADA
(Karras et al. 2020), the blur of StyleGAN2's resampling layers ("Analyzing and Improving
the Image Quality of StyleGAN", 2020, sec. 2.1 and appendix B). Only the eager reference
exists so far; the Triton kernel plugs in here.

upfirdn2d(x, f, up, down, padding): insert up-1 zeros after every pixel, pad (negative
padding crops), convolve with f (a true convolution: f is flipped unless flip_filter),
keep every down-th pixel. f is 2-D, or 1-D for a separable filter applied along both axes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"upfirdn2d: {name} must be an int or [x, y], got {value!r}")


def _padding(padding) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1) from an int, [x, y] or [x0, x1, y0, y1]."""
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) == 4:
        return tuple(int(p) for p in padding)
    raise ValueError(f"upfirdn2d: padding must be an int, [x, y] or [x0, x1, y0, y1], got {padding!r}")


def setup_filter(f, normalize: bool = True, flip_filter: bool = False, gain: float = 1,
                 separable: bool | None = None, device=None) -> torch.Tensor:
    """A filter tensor from taps: 1-D taps become their outer product unless separable (the
    default for 8 taps or more); normalised to sum 1, scaled by gain (ADA's convention)."""
    f = torch.as_tensor([1.0] if f is None else f, dtype=torch.float32, device=device)
    f = f.reshape(1) if f.ndim == 0 else f
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"setup_filter: expected 1-D or 2-D taps, got shape {tuple(f.shape)}")
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    return f * (gain ** (f.ndim / 2))


def upfirdn2d_reference(x: torch.Tensor, f: torch.Tensor | None, up=1, down=1, padding=0,
                        flip_filter: bool = False, gain: float = 1) -> torch.Tensor:
    """x: [N, C, H, W]; f: [fh, fw] or [fw] (separable) or None (identity)."""
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    f = torch.ones(1, 1, dtype=torch.float32, device=x.device) if f is None else f
    (upx, upy), (downx, downy) = _pair(up, "up"), _pair(down, "down")
    px0, px1, py0, py1 = _padding(padding)
    n, c, h, w = x.shape
    if upx > 1 or upy > 1:  # zero insertion: [N, C, H, 1, W, 1] padded to [N, C, H, upy, W, upx]
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, upx - 1, 0, 0, 0, upy - 1]).reshape(n, c, h * upy, w * upx)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]
    f = (f * gain ** (f.ndim / 2)).to(x.dtype)
    if not flip_filter:  # conv2d correlates; flipping makes it a true convolution
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)
    else:
        x = F.conv2d(x, f[None, None, None, :].repeat(c, 1, 1, 1), groups=c)
        x = F.conv2d(x, f[None, None, :, None].repeat(c, 1, 1, 1), groups=c)
    return x[:, :, ::downy, ::downx]


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, backend="auto"):
    """Upsample + FIR filter + downsample; see upfirdn2d_reference for the semantics."""
    resolve("upfirdn2d", backend, x, has_triton=False)
    return upfirdn2d_reference(x, f, up, down, padding, flip_filter, gain)


def _size(f: torch.Tensor | None) -> tuple[int, int]:
    if f is None:
        return 1, 1
    return (f.shape[-1], f.shape[0]) if f.ndim == 2 else (f.shape[0], f.shape[0])


def filter2d(x, f, padding=0, flip_filter=False, gain=1, backend="auto"):
    """Filter with f, padded so the output keeps the input's size."""
    px0, px1, py0, py1 = _padding(padding)
    fw, fh = _size(f)
    pad = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, gain=gain, backend=backend)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, backend="auto"):
    """Upsample by `up` with the interpolation filter f; the gain keeps the mean."""
    (upx, upy), (px0, px1, py0, py1) = _pair(up, "up"), _padding(padding)
    fw, fh = _size(f)
    pad = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=up, padding=pad, flip_filter=flip_filter, gain=gain * upx * upy, backend=backend)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, backend="auto"):
    """Low-pass with f, then keep every `down`-th pixel."""
    (downx, downy), (px0, px1, py0, py1) = _pair(down, "down"), _padding(padding)
    fw, fh = _size(f)
    pad = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2,
           py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter, gain=gain, backend=backend)
