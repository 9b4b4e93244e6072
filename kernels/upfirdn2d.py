"""Upsample, FIR-filter, downsample: `upfirdn2d` with the semantics of StyleGAN2-ADA
(Karras et al. 2020), the blur of StyleGAN2's resampling layers ("Analyzing and Improving
the Image Quality of StyleGAN", 2020, sec. 2.1 and appendix B). Only the eager reference
exists so far; the Triton kernel plugs in here.

upfirdn2d(x, f, up, down, padding): insert up-1 zeros after every pixel, pad (negative
padding crops), convolve with f (a true convolution: f is flipped unless flip_filter),
keep every down-th pixel. f is 2-D, or 1-D for a separable filter applied along both axes.

The Triton kernel computes each output pixel directly as a sum over the filter taps of the
zero-stuffed, padded input, so the up-sampled and padded intermediates never exist in
memory (eager: pad, zero-insert, grouped conv, strided slice). One program owns a block of
output pixels of one (sample, channel) plane. The gradient is the same op with up and down
swapped, the filter flipped and the padding adjusted (as in StyleGAN2-ADA), so it is
differentiable to any order, as R1 through a resampling discriminator needs.
"""
import torch
import torch.nn.functional as F

from ._backend import resolve, tl, triton


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


if triton is not None:
    @triton.jit
    def _upfirdn2d_kernel(x_ptr, k_ptr, y_ptr, H, W, OH, OW, UPX, UPY, DOWNX, DOWNY, PX0, PY0,
                          FH: tl.constexpr, FW: tl.constexpr, BLOCK: tl.constexpr):
        """y[oy, ox] = sum_ij k[i, j] * up(x)[oy * down + i - p0, ox * down + j - p0] for one plane."""
        plane, pix = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        oy, ox = pix // OW, pix % OW
        inside = pix < OH * OW
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(FH):
            qy = oy * DOWNY + i - PY0  # row in the zero-stuffed input
            row_ok = (qy >= 0) & (qy < H * UPY) & (qy % UPY == 0)
            for j in tl.static_range(FW):
                qx = ox * DOWNX + j - PX0
                ok = inside & row_ok & (qx >= 0) & (qx < W * UPX) & (qx % UPX == 0)
                v = tl.load(x_ptr + plane * H * W + (qy // UPY) * W + qx // UPX, mask=ok, other=0.0)
                acc += v.to(tl.float32) * tl.load(k_ptr + i * FW + j)
        tl.store(y_ptr + plane * OH * OW + pix, acc.to(y_ptr.dtype.element_ty), mask=inside)


def _correlation_taps(f: torch.Tensor | None, flip_filter: bool, gain: float, device) -> torch.Tensor:
    """The 2-D taps the kernel correlates with: f (outer product if separable), flipped for a
    true convolution unless flip_filter, times gain; float32."""
    f = torch.ones(1, 1, device=device) if f is None else f.to(device=device, dtype=torch.float32)
    f = torch.outer(f, f) if f.ndim == 1 else f
    f = f if flip_filter else f.flip([0, 1])
    return (f * gain).contiguous()


class Upfirdn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain):
        (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
        n, c, h, w = x.shape
        taps = _correlation_taps(f, flip_filter, gain, x.device)
        fh, fw = taps.shape
        oh, ow = (h * upy + py0 + py1 - fh) // downy + 1, (w * upx + px0 + px1 - fw) // downx + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"upfirdn2d: padding {list(padding)} and a {fh}x{fw} filter leave no output "
                             f"for input {h}x{w}")
        y = x.new_empty(n, c, oh, ow)
        block = min(256, triton.next_power_of_2(oh * ow))
        _upfirdn2d_kernel[(n * c, triton.cdiv(oh * ow, block))](x.contiguous(), taps, y, h, w, oh, ow, upx, upy,
                                                                  downx, downy, px0, py0, FH=fh, FW=fw, BLOCK=block)
        ctx.save_for_backward(f)
        ctx.args = (x.shape, up, down, padding, flip_filter, gain, fh, fw)
        return y

    @staticmethod
    def backward(ctx, dy):
        (f,) = ctx.saved_tensors
        (_, _, h, w), (upx, upy), (downx, downy), (px0, _, py0, _), flip_filter, gain, fh, fw = ctx.args
        oh, ow = dy.shape[2:]
        # the adjoint: swap up/down, flip the filter, pad so the output is the input's size
        padding = (fw - px0 - 1, w * upx - ow * downx + px0 - upx + 1,
                   fh - py0 - 1, h * upy - oh * downy + py0 - upy + 1)
        dx = Upfirdn2d.apply(dy, f, (downx, downy), (upx, upy), padding, not flip_filter, gain)
        return dx, None, None, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, backend="auto"):
    """Upsample + FIR filter + downsample; see upfirdn2d_reference for the semantics."""
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if resolve("upfirdn2d", backend, x) == "eager" or (f is not None and f.requires_grad) or x.numel() == 0:
        return upfirdn2d_reference(x, f, up, down, padding, flip_filter, gain)
    if f is not None and f.ndim not in (1, 2):
        raise ValueError(f"upfirdn2d: f must be 1-D or 2-D, got shape {tuple(f.shape)}")
    return Upfirdn2d.apply(x, f, _pair(up, "up"), _pair(down, "down"), _padding(padding), bool(flip_filter),
                           float(gain))


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
