"""limner's 3x3 convolution for the CPU: Winograd's minimal filtering (cpu_winograd.cpp).

conv2d_winograd(x, weight, bias) = F.conv2d(x, weight, bias, padding=1) for float32 or bf16 CPU
tensors, x channels-last, a 3x3 weight, stride 1, no gradient to take (inference; with one, float32,
`conv2d` runs WinogradConv2d: its forward, input gradient and weight gradient by this kernel).
Lavin & Gray 2016: F(4x4, 3x3) multiplies a quarter as often as the direct convolution, F(2x2, 3x3) 1/2.25 as often;
the price is the transforms (cheap next to the matrix products once there are a few dozen
channels) and rounding: F(2,3)'s results are as close to float64 as oneDNN's direct
convolution's, F(4,3)'s a few times further (its output transform multiplies by up to 8; measured in
tests/test_kernels.py and benchmarks/results/cpu-kernel-measurements.md), still within float32's
reach of the exact result. `tile` picks m by the image's size, `fits` says which inputs it takes,
and `faster` where it measured faster than oneDNN's direct convolution (at least 8 channels in and
out; fewer, as a UNet's 4-channel input and output convolutions, stay direct). The weight's
transform is redone at every call in float32 (a 1280x1280 one in ~3 ms): kept, it would cost 16/9
(F(2,3)) or 4x (F(4,3)) the weight's memory. bf16 (CPUs without AMX: there oneDNN's direct bf16
convolution already runs at the avx512_bf16 peak) runs F(2x2, 3x3) only, tiles and weight
transformed in float32 and rounded to bf16 once, the products by oneDNN's bf16 GEMMs into float32;
its transformed weight is kept in the layer's `Packed` holder, where oneDNN's packed copy would
have been.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import AMX, forced_eager, trace_constant, wants_grad
from ._cpp import CppKernel
from .onednn_conv import Packed, conv2d_packed

KERNEL = CppKernel("cpu_winograd.cpp", ["weights", "forward", "weights_bf16", "forward_bf16", "forward_fused",
                                         "bf16_available", "weight_grad"],
                   "3x3 convolutions use oneDNN's direct ones", flags=("-mavx512bf16", "-mavx512bw", "-mavx512vl"))
BACKENDS = ("auto", "winograd", "eager")
# Tiles per transform-multiply-transform round: up to 1,024 (the matrix products re-read the
# transformed weight once a round; all tiles at once was 1.1-3x slower at 256-512 px, the
# transformed tensors out of cache) and at most CHUNK_BYTES of transformed inputs and outputs
# (a VAE decoder's 512-channel rounds would hold 150 MB; at 48 MB they run ~5% slower).
CHUNK, CHUNK_BYTES = 1024, 48 << 20
# Up to 256 channels in and out together, each task takes its 16-64 tiles through the input
# transform, the products (oneDNN's batch-reduce GEMMs) and the output transform while they stay in
# its cache, in one parallel region: 1.1-1.7x the rounds above at the demo UNet's shapes, 1.5-1.9x at
# 128 channels over 64-512 px (the VAE decoder's last level); at 256+256 channels 0.9x
# (cpu-kernel-measurements.md).
FUSED_CHANNELS = 256
# A float32 weight's transform is kept between calls (in the convolution's Packed) up to this size:
# small convolutions' transforms cost a share of their call (the demo UNet's, at most 0.6 MB each:
# cpu-kernel-measurements.md), large ones' a smaller one, and keeping them would add their size to
# the model's memory (SD 1.5's 320-2560-channel ones: 15-210 MB each, 4x the weight at F(4,3)).
KEEP_BYTES = 1 << 20
# In training the weight's gradient goes by Winograd too (weight_grad) where it measured faster than
# oneDNN's: 32 or more channels in and out (1.2-2x at the demo UNet's training shapes; at 8 channels
# 0.6x), by F(4x4, 3x3) up to 256 x 256 channels (its [36, Cout, Cin] sums 9 MB) and F(2x2, 3x3)
# above (at 640-1280 channels F(4,3)'s 59-236 MB of sums cost more than its fewer products save):
# benchmarks/results/cpu-kernel-measurements.md.
WEIGHT_GRAD_CHANNELS, WEIGHT_GRAD_F4 = 32, 256 * 256


def _transformed(w: torch.Tensor, m: int, ci_major: bool) -> torch.Tensor:  # [A*A, Cout, Cin], [A*A, Cin, Cout]
    a = (m + 2) ** 2
    return w.new_empty(a, w.shape[1], w.shape[0]) if ci_major else w.new_empty(a, w.shape[0], w.shape[1])


def _image(x: torch.Tensor, channels: int) -> torch.Tensor:  # the forwards' channels-last [N, Cout, H, W]
    return x.new_empty(x.shape[0], channels, x.shape[2], x.shape[3]).contiguous(memory_format=torch.channels_last)


KERNEL.define("weights", "(Tensor w, int m, bool ci_major) -> Tensor", _transformed)
KERNEL.define("forward", "(Tensor x, Tensor U, Tensor? bias, int m, int chunk) -> Tensor",
              lambda x, U, bias, m, chunk: _image(x, U.shape[1]))
KERNEL.define("forward_fused", "(Tensor x, Tensor U, Tensor? bias, int m, int rows) -> Tensor",
              lambda x, U, bias, m, rows: _image(x, U.shape[2]))
KERNEL.define("weights_bf16", "(Tensor w) -> Tensor", lambda w: _transformed(w, 2, True))
KERNEL.define("forward_bf16", "(Tensor x, Tensor U, Tensor? bias, int chunk) -> Tensor",
              lambda x, U, bias, chunk: _image(x, U.shape[2]))
KERNEL.define("weight_grad", "(Tensor x, Tensor dy, int m, int chunk) -> Tensor",
              lambda x, dy, m, chunk: x.new_empty(dy.shape[1], 3, 3, x.shape[1]).permute(0, 3, 1, 2))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@trace_constant
def _bf16_runs() -> bool:
    """Whether the bf16 path's GEMMs run on this CPU (AMX or avx512_bf16; the kernel tries once)."""
    module = KERNEL.module()
    return module is not None and module.bf16_available()


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=1, dilation=1,
         groups: int = 1, training: bool = False) -> bool:
    """Whether conv2d_winograd takes these: float32 or bf16 CPU tensors (x and weight of one dtype),
    x 4-D channels-last, a 3x3 weight, stride 1, padding 1, dilation 1, one group, no gradient
    (`training`: float32 ones with a gradient to take too, conv2d's WinogradConv2d),
    on a CPU where the kernel builds (AVX-512); float32 not under
    autocast (which would compute in bf16); bf16 with an even number of input channels, a contiguous
    or channels-last weight, on a CPU whose bf16 GEMMs run on avx512_bf16 without AMX (the only kind
    it was tested and measured on: with AMX oneDNN's GEMMs take other paths, and its direct bf16
    convolution is ~5x faster there)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    bf16 = x.dtype is torch.bfloat16
    if not bf16 and torch.is_autocast_enabled("cpu"):
        return False
    return ((not wants_grad(x, weight, bias) or training and not bf16) and x.ndim == 4 and weight.ndim == 4
            and tuple(weight.shape[2:]) == (3, 3) and x.shape[1] == weight.shape[1] and groups == 1
            and not isinstance(padding, str)
            and _pair(stride) == (1, 1) and _pair(padding) == (1, 1) and _pair(dilation) == (1, 1)
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and (bias is None or (bias.device.type == "cpu" and bias.dtype in (torch.float32, x.dtype)))
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last)
            and (not bf16 or (not AMX and x.shape[1] % 2 == 0 and (weight.is_contiguous() or weight.stride(1) == 1)))
            and KERNEL.available() and (not bf16 or _bf16_runs()))


def faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where it measured faster than oneDNN's direct convolution on this project's CPUs
    (benchmarks/results/cpu-kernel-measurements.md): float32 with 8 or more channels in and out;
    bf16 (its transformed weight kept; CPUs without AMX, `fits`) with 64 or more on the AMD EPYC,
    1.15-1.9x at SD's shapes (at 32 channels 0.93x)."""
    if x.dtype is torch.bfloat16:
        return min(weight.shape[0], weight.shape[1]) >= 64
    return min(weight.shape[0], weight.shape[1]) >= 8


def tile(x: torch.Tensor) -> int:
    """m of F(m x m, 3 x 3): for float32 4 from 32x32 pixels up, 2 below (at 8-16 px with 1,280
    channels F(4,3)'s larger weight transform and padded tiles cost more than its fewer
    multiplications save); for bf16 always 2 (F(4,3)'s transforms multiply bf16's rounding by up to 8)."""
    return 4 if x.dtype is torch.float32 and min(x.shape[2], x.shape[3]) >= 32 else 2


def conv2d_winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    m: int | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd's F(m x m, 3 x 3) (float32: m 2 or 4, default
    `tile`; bf16: 2), channels-last out."""
    if not fits(x, weight, bias):
        raise ValueError(f"conv2d_winograd takes float32 or bf16 CPU x [N, C, H, W] in channels-last memory with a "
                         f"[Cout, C, 3, 3] weight of its dtype (stride 1, padding 1; bf16: C even, on a CPU with "
                         f"avx512_bf16 and no AMX), no gradient and no float32 autocast, on a CPU with AVX-512; got x "
                         f"{tuple(x.shape)} {x.dtype} on {x.device.type}, weight {tuple(weight.shape)} {weight.dtype}: "
                         f"use F.conv2d for these")
    m = tile(x) if m is None else m
    if m not in ((2,) if x.dtype is torch.bfloat16 else (2, 4)):
        raise ValueError(f"conv2d_winograd: m must be 2 or 4 (F(2x2, 3x3) or F(4x4, 3x3); bf16: 2), got {m!r} for "
                         f"{x.dtype}")
    return _winograd(x, weight, bias, m)


def _winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int,
              packed: Packed | None = None) -> torch.Tensor:
    """The kernel's call, for inputs `fits` has taken (a bf16 weight's transform kept in `packed`, a
    float32 one's up to KEEP_BYTES)."""
    fn = KERNEL.function
    if torch.compiler.is_compiling():  # the graph keeps the transform (inductor's freezing folds a frozen weight's)
        packed = None
    if x.dtype is torch.bfloat16:  # transformed inputs bf16, products float32
        per_tile = 16 * (2 * weight.shape[1] + 4 * weight.shape[0])
        U = fn("weights_bf16")(weight) if packed is None else packed.prepared(
            ("winograd", weight.data_ptr(), weight._version), lambda: fn("weights_bf16")(weight))
        return fn("forward_bf16")(x, U, bias, min(CHUNK, max(64, CHUNK_BYTES // per_tile)))
    channels = weight.shape[0] + weight.shape[1]
    fused = channels <= FUSED_CHANNELS
    if packed is None or weight.shape[0] * weight.shape[1] * (m + 2) ** 2 * 4 > KEEP_BYTES:
        U = fn("weights")(weight, m, fused)
    else:
        U = packed.prepared(("winograd", m, fused, weight.data_ptr(), weight._version),
                            lambda: fn("weights")(weight, m, fused))
    if fused:  # each task's tiles through all three steps in its cache
        tiles = x.shape[0] * -(-x.shape[2] // m) * -(-x.shape[3] // m)
        rows = max(16, min(64, tiles // (2 * _threads())))  # two tasks a thread at least
        return fn("forward_fused")(x, U, bias, m, rows)
    return fn("forward")(x, U, bias, m, _chunk(m, channels))


@trace_constant
def _threads() -> int:
    return torch.get_num_threads()


def _chunk(m: int, channels: int) -> int:
    """Tiles per round of the kernel's forward and weight_grad for channels in + out (CHUNK, CHUNK_BYTES)."""
    return min(CHUNK, max(64, CHUNK_BYTES // ((m + 2) ** 2 * 4 * channels)))


def weight_grad(x: torch.Tensor, grad: torch.Tensor, m: int) -> torch.Tensor:
    """The 3x3 weight's gradient of a stride-1, padding-1 convolution of x whose output has gradient
    `grad` (both float32 channels-last [N, C, H, W]), by F(m x m, 3 x 3): the tiles' transforms, A*A
    matrix products [Cout, tiles] x [tiles, Cin] summed over the tiles, G^T (.) G back to 3x3
    (Lavin & Gray 2016, section 5). [Cout, Cin, 3, 3] in channels-last strides."""
    return KERNEL.function("weight_grad")(x, grad, m, _chunk(m, x.shape[1] + grad.shape[1]))


def weight_grad_tile(weight: torch.Tensor) -> int | None:
    """m for the weight's gradient by Winograd, None where oneDNN's measured faster (WEIGHT_GRAD_*)."""
    if min(weight.shape[0], weight.shape[1]) < WEIGHT_GRAD_CHANNELS:
        return None
    return 4 if weight.shape[0] * weight.shape[1] <= WEIGHT_GRAD_F4 else 2


class WinogradConv2d(torch.autograd.Function):
    """F.conv2d(x, weight, bias, padding=1) with its gradients, float32, by Winograd: the output, the
    input's gradient (the output gradient's convolution with the weight turned half a turn, its in
    and out channels swapped) and, with 32+ channels in and out, the weight's (`weight_grad`); the
    bias's is the output gradient's sum, fewer channels' weight gradient oneDNN's (aten's
    convolution_backward). The demo UNet's 3x3 convolutions forward + backward 1.32-1.37x oneDNN's
    (benchmarks/winograd_conv.py --train). Under create_graph (a gradient penalty) the gradients
    are torch's own, differentiable again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.m, ctx.bias_sizes = m, None if bias is None else list(bias.shape)
        return _winograd(x, weight, bias, m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous(memory_format=torch.channels_last)

        def onednn(mask: list[bool]):  # aten's gradients of this stride-1, padding-1 convolution
            return torch.ops.aten.convolution_backward(grad, x, weight, ctx.bias_sizes, [1, 1], [1, 1], [1, 1], False,
                                                       [0, 0], 1, mask)
        if torch.is_grad_enabled():  # create_graph: gradients that are differentiable again
            return (*onednn([want_x, want_w, want_b]), None)
        grad_x = _winograd(grad, weight.flip(2, 3).transpose(0, 1).contiguous(), None, ctx.m) if want_x else None
        m = weight_grad_tile(weight) if want_w else None
        if m is None:
            _, grad_w, grad_b = onednn([False, want_w, want_b]) if want_w or want_b else (None, None, None)
        else:
            grad_w, grad_b = weight_grad(x, grad, m), grad.sum((0, 2, 3)) if want_b else None
        return grad_x, grad_w, grad_b, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, backend: str = "auto", packed: Packed | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups); "auto": by Winograd where it
    fits and measured faster (not under LIMNER_KERNELS=eager; float32 with autograd too, by
    WinogradConv2d), else with `packed` oneDNN's
    convolution on a weight packed once (conv2d_packed, bf16), else F.conv2d; "winograd": always
    (refused where it does not fit); "eager": F.conv2d. `packed` (one per convolution) keeps the
    prepared weight between calls: oneDNN's packing, or a bf16 weight's Winograd transform."""
    if backend not in BACKENDS:
        raise ValueError(f"conv2d: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    fit = backend != "eager" and fits(x, weight, bias, stride, padding, dilation, groups, training=True)  # asked once
    if backend == "winograd" or (backend == "auto" and not forced_eager() and fit and faster(x, weight)):
        if not fit:
            raise ValueError(f"conv2d: backend 'winograd' takes a float32 or bf16 3x3 convolution with stride 1, "
                             f"padding 1, one group, a channels-last CPU input (bf16: no gradient), on a CPU with "
                             f"AVX-512; "
                             f"got x {tuple(x.shape)} {x.dtype} on {x.device.type}, weight {tuple(weight.shape)}, "
                             f"stride {stride}, padding {padding}, groups {groups}; use backend='eager' or 'auto'")
        if wants_grad(x, weight, bias):
            return WinogradConv2d.apply(x, weight, bias, tile(x))
        return _winograd(x, weight, bias, tile(x), packed)
    if backend == "auto" and packed is not None:
        return conv2d_packed(x, weight, bias, stride, padding, dilation, groups, packed)  # (F.conv2d if unfit)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
