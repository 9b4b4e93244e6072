"""Triton kernels (run by the interpreter on CPU) against their eager references: odd shapes,
float32 / float16 / bfloat16, forward and backward; float64 references on the same
(rounded) inputs, so each dtype's tolerance measures only the kernel's error."""
import json
import time

import pytest
import torch

import limner
from limner.attention import PreferenceTable, preferred_backend, shape_key
from limner.kernels import (
    adaln_modulate,
    attention_math,
    attention_sdpa,
    attention_triton,
    bias_act,
    gated_residual,
    geglu,
    group_norm_silu,
    guided_update,
    linear,
    onednn_linear,
    setup_filter,
    upfirdn2d,
)
from limner.kernels.adaln import adaln_modulate_reference, gated_residual_reference
from limner.kernels.bias_act import ACTIVATIONS, bias_act_reference
from limner.kernels.geglu import geglu_reference
from limner.kernels.group_norm_silu import group_norm_silu_reference
from limner.kernels.sampler_update import guided_update_reference
from limner.kernels.upfirdn2d import upfirdn2d_reference
from limner.protocols import TextEmbedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # relative to the largest |value|


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = (got.double() - want.double()).abs().max().item()
    bound = TOL[dtype] * max(want.abs().max().item(), 1.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"


def check_against_reference(fused, reference, inputs, dtype, seed=0):
    """Forward and every input's gradient of fused (dtype) against reference (float64)."""
    low = [t.to(dtype).requires_grad_() if t is not None else None for t in inputs]
    high = [t.detach().double().requires_grad_() if t is not None else None for t in low]
    out = fused(*low)
    want = reference(*high)
    assert out.dtype == dtype and out.shape == want.shape
    assert_near(out, want, dtype, "forward")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, [t for t in low if t is not None], dy.to(dtype))
    grads_want = torch.autograd.grad(want, [t for t in high if t is not None], dy.double())
    for i, (g, w) in enumerate(zip(grads, grads_want)):
        assert_near(g, w, dtype, f"gradient {i}")


def randn(*shape, seed=0, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + offset


# --- UNet / DiT paths ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups, parts", [
    ((3, 6, 5, 7), 3, "wbss"), ((2, 12, 11), 4, "w-s-"), ((2, 4, 1, 1), 2, "----"), ((1, 10, 3, 3, 3), 5, "-b-s"),
])
def test_group_norm_silu_matches_reference(shape, groups, parts, dtype):
    n, c = shape[:2]
    x = randn(*shape, scale=3.0, offset=2.0)  # an offset mean tests the variance's cancellation
    params = [randn(c, seed=1) if parts[0] == "w" else None, randn(c, seed=2) if parts[1] == "b" else None,
              randn(n, c, seed=3) if parts[2] == "s" else None, randn(n, c, seed=4) if parts[3] == "s" else None]

    def fused(x, w, b, sc, sh):
        return group_norm_silu(x, groups, w, b, 1e-5, sc, sh, backend="triton")

    def reference(x, w, b, sc, sh):
        return group_norm_silu_reference(x, groups, w, b, 1e-5, sc, sh)

    check_against_reference(fused, reference, [x, *params], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 37), (3, 1, 5), (1, 33, 130)])
def test_adaln_modulate_and_gated_residual_match_reference(shape, dtype):
    b, _, d = shape
    x, shift, scale, gate, y = (
        randn(*shape),
        randn(b, d, seed=1),
        randn(b, d, seed=2),
        randn(b, d, seed=3),
        randn(*shape, seed=4),
    )
    check_against_reference(
        lambda *a: adaln_modulate(*a, backend="triton"), adaln_modulate_reference, [x, shift, scale], dtype
    )
    check_against_reference(
        lambda *a: gated_residual(*a, backend="triton"), gated_residual_reference, [x, gate, y], dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 38), (7, 2), (2, 1, 3, 2050)])
def test_geglu_matches_reference(shape, dtype):
    check_against_reference(lambda x: geglu(x, backend="triton"), geglu_reference, [randn(*shape, scale=2.0)], dtype)


@pytest.mark.parametrize(
    "shape, cout, bias, strided",
    [
        ((2049, 7), 5, True, False),
        ((3, 701, 13), 33, False, False),
        ((1, 1, 3), 2, True, False),
        ((5, 417, 9), 4, True, True),
    ],
)
def test_onednn_linear_matches_f_linear_forward_and_backward(shape, cout, bias, strided):
    """The 1x1-convolution route gives F.linear's values and gradients (x, weight, bias), for
    row counts that fill no tile, a single row, and a non-contiguous input."""
    x = randn(*shape[:-1], shape[-1] + 3 if strided else shape[-1])
    x = x[..., 3:] if strided else x
    w, b = randn(cout, shape[-1], seed=1), (randn(cout, seed=2) if bias else None)
    check_against_reference(lambda *t: linear(*t, backend="onednn"), torch.nn.functional.linear,
                            [x, w, b], torch.float32)


def test_linear_auto_takes_onednn_only_for_many_float32_cpu_rows(monkeypatch):
    taken = []
    real = onednn_linear.linear_onednn
    monkeypatch.setattr(onednn_linear, "linear_onednn", lambda *a: taken.append(a[0].shape) or real(*a))
    monkeypatch.setattr(onednn_linear, "_X86", True)
    rows = onednn_linear.MIN_ROWS
    w = randn(onednn_linear.MIN_MACS // (rows * 64), 64)  # exactly MIN_MACS multiply-adds at MIN_ROWS rows
    many, few = randn(rows, 64), randn(rows - 1, 64)
    for x, weight in ((many, w), (few, w), (many.double(), w.double()), (many, w[:-1])):  # last: too little work
        linear(x, weight)
    assert taken == [many.shape]
    monkeypatch.setenv("LIMNER_KERNELS", "eager")
    linear(many, w)
    assert taken == [many.shape]
    monkeypatch.delenv("LIMNER_KERNELS")
    with pytest.raises(ValueError, match="linear: unknown backend 'mkl'; valid: auto, onednn, eager"):
        linear(many, w, backend="mkl")
    with pytest.raises(ValueError, match="backend 'onednn' takes float32 CPU tensors"):
        linear(many.double(), w.double(), backend="onednn")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize(
    "n, cin, cout, size, kernel, stride, padding, groups",
    [(2, 13, 7, 9, 3, 1, 1, 1), (1, 6, 10, 5, 3, 2, 1, 2), (3, 5, 3, 11, 1, 1, 0, 1), (1, 8, 8, 7, 3, 1, 2, 8)],
)
def test_packed_conv2d_equals_f_conv2d_and_repacks_when_needed(n, cin, cout, size, kernel, stride, padding, groups):
    """bf16, channels-last, no grad: the packed weight gives F.conv2d's bits (same oneDNN
    algorithm) and is within bf16 rounding of a float64 reference; a new input shape or an
    in-place change to the weight packs again; float32 and autograd stay on F.conv2d."""
    from limner.kernels import Packed, conv2d_packed

    F = torch.nn.functional
    cl = torch.channels_last
    x = randn(n, cin, size, size).to(torch.bfloat16).contiguous(memory_format=cl)
    w, b = randn(cout, cin // groups, kernel, kernel, seed=1).to(torch.bfloat16), randn(cout, seed=2).to(torch.bfloat16)
    packed = Packed()
    with torch.no_grad():
        out = conv2d_packed(x, w, b, stride, padding, 1, groups, packed)
        assert packed.weight is not None and out.is_contiguous(memory_format=cl)
        assert torch.equal(out, F.conv2d(x, w, b, stride, padding, 1, groups))
        exact = F.conv2d(x.double(), w.double(), b.double(), stride, padding, 1, groups)
        assert float((out.double() - exact).abs().max()) <= 0.02 * float(exact.abs().max())
        first = packed.weight
        conv2d_packed(x, w, b, stride, padding, 1, groups, packed)
        assert packed.weight is first  # packed once for this shape
        x2 = randn(n + 1, cin, size + 2, size + 2, seed=3).to(torch.bfloat16).contiguous(memory_format=cl)
        assert torch.equal(conv2d_packed(x2, w, b, stride, padding, 1, groups, packed),
                           F.conv2d(x2, w, b, stride, padding, 1, groups))
        w.mul_(-1)
        assert torch.equal(conv2d_packed(x2, w, b, stride, padding, 1, groups, packed),
                           F.conv2d(x2, w, b, stride, padding, 1, groups))
        unused = Packed()
        conv2d_packed(x.float(), w.float(), b.float(), stride, padding, 1, groups, unused)
    conv2d_packed(x, w, b, stride, padding, 1, groups, unused)  # grad mode on
    assert unused.weight is None


def winograd_kernel():
    from limner.kernels import cpu_winograd

    if cpu_winograd.KERNEL.module() is None:
        pytest.skip(f"limner's Winograd convolution is not available here: {cpu_winograd.KERNEL.failure}")
    return cpu_winograd


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n, cin, cout, h, w, bias, weight_layout, chunk", [
    (1, 3, 5, 7, 9, True, "contiguous", 1024), (2, 17, 33, 13, 6, False, "channels_last", 5),
    (3, 40, 24, 33, 35, True, "channels_last", 7), (1, 64, 16, 1, 2, True, "contiguous", 1),
    (4, 24, 40, 33, 29, True, "contiguous", 1024),
])
def test_winograd_conv2d_matches_a_float64_reference(monkeypatch, m, fused, n, cin, cout, h, w, bias, weight_layout,
                                                     chunk):
    """F(2x2, 3x3) and F(4x4, 3x3) against a float64 convolution over odd shapes (channels not a
    multiple of 16, images not a multiple of m, 1-2 pixels, tiles in chunks that leave a partial
    last one; fused: blocks of 16-64 tiles a task, several tasks, a partial last one), either weight
    layout, by both ways (rounds of transform-multiply-transform, or fused per block). Error in
    float32 epsilons times |x| conv |w| + |b| (the componentwise bound of a sum, per output):
    oneDNN's direct convolution measures 0.3-5 here, F(2,3) 1-2.5, F(4,3) 4-25 (its transforms scale
    by up to 8); held to 8 and 64."""
    cpu_winograd = winograd_kernel()
    monkeypatch.setattr(cpu_winograd, "CHUNK", chunk)
    monkeypatch.setattr(cpu_winograd, "FUSED_CHANNELS", 10 ** 6 if fused else 0)
    F = torch.nn.functional
    x = randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    wt = randn(cout, cin, 3, 3, seed=1) / cin ** 0.5
    wt = wt.contiguous(memory_format=torch.channels_last) if weight_layout == "channels_last" else wt
    b = randn(cout, seed=2) if bias else None
    b64 = None if b is None else b.double()
    exact = F.conv2d(x.double(), wt.double(), b64, padding=1)
    scale = F.conv2d(x.double().abs(), wt.double().abs(), None if b is None else b64.abs(), padding=1) * 2.0 ** -24
    with torch.no_grad():
        out = cpu_winograd.conv2d_winograd(x, wt, b, m=m)
    assert out.shape == exact.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert float(((out.double() - exact).abs() / scale).max()) <= (8 if m == 2 else 64)


def weight_grad_scale(grad: torch.Tensor, x: torch.Tensor, cin: int) -> torch.Tensor:
    """float32's epsilon times the weight gradient of |x| with output gradient |grad| (the componentwise
    bound of a sum over batch and pixels), the largest of each (out, in) channel pair's nine: Winograd's
    transforms mix a pair's nine weights, so a small one (a 1-pixel-high image's top and bottom rows:
    exactly 0) carries rounding of the pair's large ones."""
    w = torch.zeros(grad.shape[1], cin, 3, 3, dtype=torch.float64)
    scale = torch.ops.aten.convolution_backward(grad.double().abs(), x.double().abs(), w, None, [1, 1], [1, 1],
                                                [1, 1], False, [0, 0], 1, [False, True, False])[1] * 2.0 ** -24
    return scale.amax(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("n, cin, cout, h, w, chunk", [
    (1, 9, 11, 7, 9, 1024), (2, 17, 33, 13, 6, 5), (3, 40, 24, 33, 35, 64), (1, 16, 16, 1, 2, 1),
    (4, 33, 48, 17, 19, 7),
])
def test_winograd_weight_grad_matches_a_float64_reference(monkeypatch, m, n, cin, cout, h, w, chunk):
    """The weight's gradient by F(2,3) and F(4,3) (tiles' transforms, products summed over the tiles in
    rounds, a partial last one, G^T (.) G) against float64's, over odd shapes: channels not a
    multiple of 16, images not a multiple of m (the output gradient's tiles past the edge are
    zero), 1x2 pixels. Error in float32 epsilons times the gradient of |x| and |grad| per weight:
    oneDNN measures 0.5-1.8 here, F(2,3) 0.8-3.2, F(4,3) 3-17.5; held to 8 and 64."""
    cpu_winograd = winograd_kernel()
    monkeypatch.setattr(cpu_winograd, "CHUNK", chunk)
    x = randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    grad = randn(n, cout, h, w, seed=3).contiguous(memory_format=torch.channels_last)
    x64 = x.double().requires_grad_()
    w64 = (randn(cout, cin, 3, 3, seed=1) / cin ** 0.5).double().requires_grad_()
    (exact,) = torch.autograd.grad(torch.nn.functional.conv2d(x64, w64, padding=1), w64, grad.double())
    got = cpu_winograd.weight_grad(x, grad, m)
    assert got.shape == (cout, cin, 3, 3) and got.is_contiguous(memory_format=torch.channels_last)
    assert float(((got.double() - exact).abs() / weight_grad_scale(grad, x, cin)).max()) <= (8 if m == 2 else 64)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("weight_by", ["onednn", "winograd"])
@pytest.mark.parametrize("n, cin, cout, h, w, bias, wanted", [
    (1, 9, 11, 7, 9, True, "xwb"), (2, 17, 33, 13, 6, False, "xw"), (3, 40, 24, 33, 35, True, "xwb"),
    (2, 24, 40, 5, 33, True, "x"), (1, 16, 16, 9, 9, True, "wb"),
])
def test_winograd_conv2d_gradients_match_a_float64_reference(monkeypatch, m, weight_by, n, cin, cout, h, w, bias,
                                                             wanted):
    """WinogradConv2d (conv2d with autograd, float32): the output and the gradients asked for (of the
    input, weight, bias; others None) against float64 autograd through F.conv2d on the same inputs,
    over odd shapes. The input's gradient is itself a Winograd convolution, held to its forward's
    bound (float32 epsilons times |grad| conv |w| per element: 8 for F(2,3), 64 for F(4,3)); the
    weight's, oneDNN's or Winograd's (F(4,3) at these channels), to 64 of its own bound
    (weight_grad_scale); the bias's (the output gradient's sum, or oneDNN's) to 1e-5 of the largest."""
    cpu_winograd = winograd_kernel()
    monkeypatch.setattr(cpu_winograd, "WEIGHT_GRAD_CHANNELS", 1 if weight_by == "winograd" else 10 ** 6)
    calls = []
    real = cpu_winograd.weight_grad
    monkeypatch.setattr(cpu_winograd, "weight_grad", lambda *a: calls.append(a[2]) or real(*a))
    F = torch.nn.functional
    x = randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    wt, b = randn(cout, cin, 3, 3, seed=1) / cin ** 0.5, randn(cout, seed=2) if bias else None
    grad = randn(n, cout, h, w, seed=3)  # contiguous, as a gradient may come: the kernel takes it channels-last
    ins = [t.clone().requires_grad_(k in wanted) if t is not None else None for t, k in zip((x, wt, b), "xwb")]
    out = cpu_winograd.WinogradConv2d.apply(*ins, m)
    asked = [t for t in ins if t is not None and t.requires_grad]
    got = dict(zip([k for k, t in zip("xwb", ins) if t is not None and t.requires_grad],
                   torch.autograd.grad(out, asked, grad)))
    ref = [t.double().requires_grad_() if t is not None else None for t in (x, wt, b)]
    exact_out = F.conv2d(*ref, padding=1)
    exact = dict(zip("xwb", torch.autograd.grad(exact_out, [r for r in ref if r is not None], grad.double())))
    assert set(got) == set(wanted)
    assert torch.allclose(out.double(), exact_out, rtol=0, atol=1e-4)
    if "x" in got:
        scale = F.conv_transpose2d(grad.double().abs(), wt.double().abs(), padding=1) * 2.0 ** -24
        assert float(((got["x"].double() - exact["x"]).abs() / scale).max()) <= (8 if m == 2 else 64)
    assert calls == ([4] if weight_by == "winograd" and "w" in wanted else [])
    if "w" in got:
        assert float(((got["w"].double() - exact["w"]).abs() / weight_grad_scale(grad, x, cin)).max()) <= 64
    if "b" in got:
        assert torch.allclose(got["b"].double(), exact["b"], rtol=0, atol=1e-5 * float(exact["b"].abs().max()))


def test_winograd_conv2d_gradients_can_be_differentiated_again():
    """Under create_graph (a gradient penalty, as R1 on a discriminator) WinogradConv2d's gradients
    are torch's own: a penalty on the input's gradient has the weight gradient torch gives."""
    cpu_winograd = winograd_kernel()
    F = torch.nn.functional
    x = randn(2, 12, 11, 10).contiguous(memory_format=torch.channels_last)
    wt, b = randn(10, 12, 3, 3, seed=1) / 12 ** 0.5, randn(10, seed=2)

    def penalty_grad(conv):
        xi, wi = x.clone().requires_grad_(), wt.clone().requires_grad_()
        (gx,) = torch.autograd.grad(conv(xi, wi).square().sum(), xi, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), wi)
        return gw

    ours = penalty_grad(lambda xi, wi: cpu_winograd.WinogradConv2d.apply(xi, wi, b, 2))
    theirs = penalty_grad(lambda xi, wi: F.conv2d(xi, wi, b, padding=1))
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_conv2d_takes_winograd_only_where_it_fits_and_is_faster(monkeypatch):
    """limner.kernels.conv2d: Winograd for a float32 channels-last 3x3 stride-1 convolution (F(4,3)
    from 32 px, F(2,3) below), with autograd too (the forward, and the input's gradient where one is
    asked); F.conv2d's own bits for stride 2, 4 channels, autocast and LIMNER_KERNELS=eager;
    backend="winograd" refuses what does not fit by name."""
    cpu_winograd = winograd_kernel()
    from limner.kernels import conv2d

    F = torch.nn.functional
    calls = []
    real = cpu_winograd._winograd
    monkeypatch.setattr(cpu_winograd, "_winograd",
                        lambda x, w, b, m, packed=None: calls.append(m) or real(x, w, b, m))
    cl = torch.channels_last
    x, x_small = randn(2, 16, 32, 32).contiguous(memory_format=cl), randn(2, 16, 9, 9).contiguous(memory_format=cl)
    wt, b = randn(24, 16, 3, 3, seed=1) / 4, randn(24, seed=2)
    with torch.no_grad():
        conv2d(x, wt, b, 1, 1, 1, 1), conv2d(x_small, wt, b, 1, 1, 1, 1)
        assert calls == [4, 2]
        for args in ((x, wt, b, 2, 1, 1, 1), (x[:, :4], wt[:, :4], b, 1, 1, 1, 1), (x, wt, b, 1, 0, 1, 1)):
            assert torch.equal(conv2d(*args), F.conv2d(*args))  # stride 2, 4 channels in, padding 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(conv2d(x, wt, b, 1, 1, 1, 1), F.conv2d(x, wt, b, 1, 1, 1, 1))
        monkeypatch.setenv("LIMNER_KERNELS", "eager")
        assert torch.equal(conv2d(x, wt, b, 1, 1, 1, 1), F.conv2d(x, wt, b, 1, 1, 1, 1))
        monkeypatch.delenv("LIMNER_KERNELS")
    assert calls == [4, 2]
    w_grad = wt.clone().requires_grad_()
    conv2d(x, w_grad, b, 1, 1, 1, 1).sum().backward()  # the forward by Winograd; no input gradient asked
    assert calls == [4, 2, 4] and w_grad.grad is not None and w_grad.grad.abs().sum() > 0
    x_grad = x_small.clone().requires_grad_()
    conv2d(x_grad, wt, b, 1, 1, 1, 1).sum().backward()  # the forward and the input's gradient
    assert calls == [4, 2, 4, 2, 2] and x_grad.grad is not None and x_grad.grad.abs().sum() > 0
    with torch.no_grad(), pytest.raises(ValueError, match="backend 'winograd' takes a float32 or bf16 3x3 convolution"):
        conv2d(x, wt, b, 2, 1, 1, 1, backend="winograd")
    with pytest.raises(ValueError, match="unknown backend 'fast'; valid: auto, winograd, eager"):
        conv2d(x, wt, b, backend="fast")


def test_conv2d_float32_keeps_small_winograd_transforms_only(monkeypatch):
    """A float32 Winograd convolution with a Packed holder keeps its transformed weight when that is
    at most KEEP_BYTES (the same tensor at the next call, the same bits as made afresh, made again for
    another tile size or after an in-place change to the weight) and makes a larger one at every
    call, keeping nothing."""
    cpu_winograd = winograd_kernel()
    from limner.kernels import Packed, conv2d

    cl = torch.channels_last
    x, x_small = randn(2, 24, 32, 32).contiguous(memory_format=cl), randn(2, 24, 9, 9).contiguous(memory_format=cl)
    wt, b = randn(40, 24, 3, 3, seed=1) / 5, randn(40, seed=2)
    packed = Packed()
    with torch.no_grad():
        out = conv2d(x, wt, b, 1, 1, 1, 1, packed=packed)
        kept = packed.weight
        assert packed.key[:2] == ("winograd", 4) and torch.equal(out, cpu_winograd.conv2d_winograd(x, wt, b))
        assert torch.equal(conv2d(x, wt, b, 1, 1, 1, 1, packed=packed), out) and packed.weight is kept
        small = conv2d(x_small, wt, b, 1, 1, 1, 1, packed=packed)  # F(2,3) below 32 px: another transform
        assert packed.key[:2] == ("winograd", 2) and torch.equal(small, cpu_winograd.conv2d_winograd(x_small, wt, b))
        wt.mul_(-1)  # in place: the kept transform is stale
        again = conv2d(x_small, wt, b, 1, 1, 1, 1, packed=packed)
        assert torch.equal(again, cpu_winograd.conv2d_winograd(x_small, wt, b)) and torch.allclose(
            again, 2 * b[None, :, None, None] - small, atol=1e-4)  # the negated weight's, not the stale one's
        monkeypatch.setattr(cpu_winograd, "KEEP_BYTES", 40 * 24 * 16 * 4 - 1)  # F(2,3)'s transform: one byte over
        fresh = Packed()
        assert torch.equal(conv2d(x_small, wt, b, 1, 1, 1, 1, packed=fresh), again) and fresh.key is None


def winograd_bf16_kernel(on_amx: bool = False):
    cpu_winograd = winograd_kernel()
    if not cpu_winograd._bf16_runs():
        pytest.skip("this CPU runs no bf16 batch-reduce GEMM (AMX or avx512_bf16): no bf16 Winograd")
    if cpu_winograd.AMX and not on_amx:
        pytest.skip("bf16 Winograd is for CPUs without AMX (with AMX oneDNN's direct bf16 convolution runs)")
    return cpu_winograd


@pytest.mark.parametrize("n, cin, cout, h, w, bias, weight_layout, chunk", [
    (1, 4, 5, 7, 9, True, "contiguous", 1024), (2, 18, 33, 13, 6, False, "channels_last", 5),
    (3, 40, 24, 33, 35, True, "contiguous", 7), (1, 64, 16, 1, 2, True, "channels_last", 1),
    (2, 96, 70, 9, 8, False, "channels_last", 1024),
])
def test_winograd_conv2d_bf16_matches_a_float64_reference(monkeypatch, n, cin, cout, h, w, bias, weight_layout, chunk):
    """bf16 F(2x2, 3x3) (inputs and weights transformed in float32 and rounded to bf16 once, products
    summed in float32 by oneDNN's bf16 GEMMs) against a float64 convolution of the same bf16 numbers
    over odd shapes: channels off 16 and off the GEMM's 64-wide blocks, images off 2, 1-2 pixels,
    partial chunks, either weight layout. Error in bf16 unit roundoffs (2^-8) times |x| conv |w| +
    |b|: oneDNN's direct bf16 convolution measures 0.15-0.6 here, Winograd 0.24-1.0; held to 2."""
    cpu_winograd = winograd_bf16_kernel()
    monkeypatch.setattr(cpu_winograd, "CHUNK", chunk)
    F = torch.nn.functional
    x = randn(n, cin, h, w).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wt = (randn(cout, cin, 3, 3, seed=1) / cin ** 0.5).to(torch.bfloat16)
    wt = wt.contiguous(memory_format=torch.channels_last) if weight_layout == "channels_last" else wt
    b = randn(cout, seed=2).to(torch.bfloat16) if bias else None
    b64 = None if b is None else b.double()
    exact = F.conv2d(x.double(), wt.double(), b64, padding=1)
    scale = F.conv2d(x.double().abs(), wt.double().abs(), None if b is None else b64.abs(), padding=1) * 2.0 ** -8
    with torch.no_grad():
        out = cpu_winograd.conv2d_winograd(x, wt, b)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert float(((out.double() - exact).abs() / scale).max()) <= 2


def test_conv2d_bf16_takes_winograd_where_measured_faster_and_keeps_its_transform():
    """bf16 through limner.kernels.conv2d with a Packed holder: Winograd where `faster` says (64+
    channels without AMX; with AMX it does not fit and oneDNN's packed convolution runs), its
    transformed weight made once and kept (the same tensor at the next call), made again after an
    in-place change to the weight; 32 channels and an odd channel count go to oneDNN's packed
    convolution (F.conv2d's bits); m other than 2 is refused for bf16 by name."""
    cpu_winograd = winograd_bf16_kernel(on_amx=True)
    from limner.kernels import Packed, conv2d

    F = torch.nn.functional
    cl = torch.channels_last
    x = randn(2, 64, 16, 16).to(torch.bfloat16).contiguous(memory_format=cl)
    wt, b = (randn(64, 64, 3, 3, seed=1) / 8).to(torch.bfloat16), randn(64, seed=2).to(torch.bfloat16)
    packed = Packed()
    with torch.no_grad():
        out = conv2d(x, wt, b, 1, 1, 1, 1, packed=packed)
        if cpu_winograd.AMX:
            assert packed.key[0] == "onednn" and torch.equal(out, F.conv2d(x, wt, b, 1, 1, 1, 1))
        else:
            kept = packed.weight
            assert packed.key[0] == "winograd" and torch.equal(out, cpu_winograd.conv2d_winograd(x, wt, b))
            assert torch.equal(conv2d(x, wt, b, 1, 1, 1, 1, packed=packed), out) and packed.weight is kept
            wt.mul_(-1)  # in place: the kept transform is stale
            again = conv2d(x, wt, b, 1, 1, 1, 1, packed=packed)
            assert packed.weight is not kept and torch.equal(again, cpu_winograd.conv2d_winograd(x, wt, b))
        for xs, ws in ((x[:, :32], wt[:32, :32]), (x[:, :17], wt[:, :17])):  # 32 channels; an odd count
            xs, ws = xs.contiguous(memory_format=cl), ws.contiguous()
            assert torch.equal(conv2d(xs, ws, None, 1, 1, 1, 1, packed=Packed()), F.conv2d(xs, ws, None, 1, 1, 1, 1))
        assert not cpu_winograd.fits(x[:, :17].contiguous(memory_format=cl), wt[:, :17].contiguous(), b)
        if not cpu_winograd.AMX:
            with pytest.raises(ValueError, match="m must be 2 or 4 .* bf16: 2"):
                cpu_winograd.conv2d_winograd(x, wt, b, m=4)
        else:
            assert not cpu_winograd.fits(x, wt, b)


def test_kernel_convs_keep_the_state_dict_and_train_as_nn_conv2d():
    """limner.pipeline.kernel_convs swaps plain nn.Conv2d layers in place: same state dict,
    same outputs and gradients within Winograd's rounding, under no_grad and with autograd."""
    winograd_kernel()
    from limner.pipeline import kernel_convs

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 3, padding=1))
    x = randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        want = net(x)
    x_grad = x.clone().requires_grad_()
    net(x_grad).square().sum().backward()
    want_grad = x_grad.grad
    kernel_convs(net)
    assert all(isinstance(m, limner.nn.KernelConv2d) for m in (net[0], net[2]))
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        got = net(x)
    assert not torch.equal(got, want) and torch.allclose(got, want, rtol=0, atol=1e-5)  # Winograd ran, and agrees
    x_grad = x.clone().requires_grad_()
    net(x_grad).square().sum().backward()
    assert not torch.equal(x_grad.grad, want_grad)  # Winograd's forward and input gradient ran
    assert torch.allclose(x_grad.grad, want_grad, rtol=0, atol=1e-4 * float(want_grad.abs().max()))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, cout, bias", [((3, 37, 13), 22, True), ((5, 17), 6, False), ((2, 1, 8), 16, True)])
def test_linear_geglu_fused_matmuls_match_a_float64_reference(shape, cout, bias, dtype):
    """The two oneDNN matmuls with GELU and product in their epilogues against F.linear + GEGLU
    in float64 on the same (rounded) inputs: float32 to a few ulps, bfloat16 within its rounding
    of the gate and of the output."""
    from limner.kernels import linear_geglu
    from limner.kernels.onednn_geglu import linear_geglu_reference

    x, w = randn(*shape, scale=2.0).to(dtype), randn(cout, shape[-1], seed=1).to(dtype)
    b = randn(cout, seed=2).to(dtype) if bias else None
    want = linear_geglu_reference(x.double(), w.double(), None if b is None else b.double())
    with torch.no_grad():
        got = linear_geglu(x, w, b, backend="onednn")
        eager = linear_geglu(x, w, b, backend="eager")
    assert got.dtype == dtype and got.shape == (*shape[:-1], cout // 2)
    err, eager_err = ((t.double() - want).abs().max().item() for t in (got, eager))
    bound = (3e-6 if dtype is torch.float32 else 2 ** -7) * want.abs().max().item()
    assert err <= bound and eager_err <= bound, (err, eager_err, bound)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
def test_linear_geglu_takes_autocasts_dtype_and_leaves_autograd_to_the_reference(monkeypatch):
    """Under CPU bf16 autocast float32 weights are cast as autocast casts them (the result equals
    the one from weights already held in bf16); with a gradient to take, `auto` runs the
    reference and its gradients are the reference's; misuse is named."""
    from limner.kernels import linear_geglu, onednn_geglu
    from limner.kernels.onednn_geglu import linear_geglu_reference

    x, w, b = randn(4, 9, 24), randn(32, 24, seed=1), randn(32, seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = linear_geglu(x, w, b)
        held = linear_geglu(x, w.bfloat16(), b.bfloat16())
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, held)
    fused = []
    real = onednn_geglu.linear_geglu_onednn
    monkeypatch.setattr(onednn_geglu, "linear_geglu_onednn", lambda *a: fused.append(1) or real(*a))
    wg = w.clone().requires_grad_()
    out = linear_geglu(x, wg, b)
    (grad,) = torch.autograd.grad(out.sum(), wg)
    wr = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(linear_geglu_reference(x, wr, b).sum(), wr)
    assert not fused and torch.allclose(grad, want, atol=1e-5)
    with torch.no_grad():
        linear_geglu(x, w, b)
    assert fused == [1]
    with pytest.raises(ValueError, match="linear_geglu: unknown backend 'fast'; valid: auto, onednn, eager"):
        linear_geglu(x, w, b, backend="fast")
    with pytest.raises(ValueError, match="backend 'onednn' takes float32 or bfloat16 CPU tensors without autograd"):
        linear_geglu(x, wg, b, backend="onednn")


def test_a_hooked_projection_is_called_not_fused():
    """A forward hook on a GEGLU's projection (an unmerged LoRA is one) is honoured: the fused
    path, which reads the weights directly, is taken only where nothing hooks the layer."""
    from limner.nn import FeedForward
    from limner.plugins.sd_unet import GEGLU

    x = randn(2, 5, 8)
    for module, proj in ((GEGLU(8, 12), "proj"), (FeedForward(8, mult=2), "proj_in")):
        with torch.no_grad():
            plain = module(x)
            handle = getattr(module, proj).register_forward_hook(lambda m, args, out: out * 2)
            hooked = module(x)
            handle.remove()
        assert not torch.allclose(plain, hooked)
        with torch.no_grad():
            assert torch.allclose(module(x), plain)


# --- GAN paths -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_bias_act_matches_reference(act, dtype):
    x, b = randn(3, 5, 7, 3, scale=3.0), randn(5, seed=1)
    check_against_reference(lambda x, b: bias_act(x, b, act=act, clamp=2.5, backend="triton"),
                            lambda x, b: bias_act_reference(x, b, act=act, clamp=2.5), [x, b], dtype)


@pytest.mark.parametrize("dim, alpha, gain", [(2, 0.1, 3.0), (-1, None, None), (0, 0.3, 1.0)])
def test_bias_act_dims_and_options_match_reference(dim, alpha, gain):
    x = randn(4, 6, 9, scale=2.0)
    b = randn(x.shape[dim], seed=1)
    check_against_reference(lambda x, b: bias_act(x, b, dim=dim, act="lrelu", alpha=alpha, gain=gain, backend="triton"),
                            lambda x, b: bias_act_reference(x, b, dim=dim, act="lrelu", alpha=alpha, gain=gain),
                            [x, b], torch.float32)
    check_against_reference(lambda x: bias_act(x, None, act="swish", backend="triton"),
                            lambda x: bias_act_reference(x, None, act="swish"), [x], torch.float32)


@pytest.mark.parametrize("act", ["lrelu", "swish", "tanh", "softplus", "elu"])
def test_bias_act_second_derivative_matches_reference(act):
    """R1's pattern: the gradient norm of a two-layer critic, differentiated again w.r.t. its weights."""
    gen = torch.Generator().manual_seed(0)
    x0, w1, w2 = torch.randn(4, 6, generator=gen), torch.randn(6, 7, generator=gen), torch.randn(7, 3, generator=gen)
    b1, b2 = torch.randn(7, generator=gen), torch.randn(3, generator=gen)
    results = []
    for backend in ("triton", "eager"):
        x, *params = (t.clone().requires_grad_() for t in (x0, w1, b1, w2, b2))
        h = bias_act(x @ params[0], params[1], act="lrelu", backend=backend)
        score = bias_act(h @ params[2], params[3], act=act, clamp=3.0, backend=backend).sum()
        (gx,) = torch.autograd.grad(score, x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), params))
    assert all(w.abs().max() > 1e-3 for w in results[1][::2])  # the weights' second derivatives are not trivial
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


UPFIRDN_CASES = [
    (dict(up=2, padding=[2, 1, 2, 1]), [1, 3, 3, 1]),
    (dict(down=2, padding=1), [1, 3, 3, 1]),
    (dict(up=(2, 1), down=(1, 3), padding=[1, -1, 0, 2], flip_filter=True, gain=3.0), "random3x5"),
    (dict(padding=[0, 0, 1, -1]), "separable4"),
    (dict(up=3, down=2, padding=[3, 2, 1, 4]), [1, 2, 1]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options, taps", UPFIRDN_CASES, ids=[str(c[0]) for c in UPFIRDN_CASES])
def test_upfirdn2d_matches_reference_to_second_order(options, taps, dtype):
    f = (randn(3, 5, seed=7) if taps == "random3x5" else randn(4, seed=7) if taps == "separable4"
         else setup_filter(taps))
    x = randn(2, 3, 7, 5)
    check_against_reference(lambda x: upfirdn2d(x, f, backend="triton", **options),
                            lambda x: upfirdn2d_reference(x, f.double(), **options), [x], dtype)
    # the gradient is upfirdn2d again: differentiate it w.r.t. the incoming gradient
    xs = [x.to(dtype).requires_grad_(), x.double().requires_grad_()]
    outs = [upfirdn2d(xs[0], f, backend="triton", **options), upfirdn2d_reference(xs[1], f.double(), **options)]
    dys = [randn(*outs[1].shape, seed=5).to(t.dtype).requires_grad_() for t in (outs[0], outs[1])]
    second = []
    for out, xi, dy in zip(outs, xs, dys):
        (g,) = torch.autograd.grad(out, xi, dy, create_graph=True)
        second.append(torch.autograd.grad(g.float().square().sum(), dy)[0])
    assert_near(second[0], second[1], dtype, "second order")


# --- sampler update and attention ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", ["cond", "cond+uncond", "cond+uncond+old+noise"])
def test_guided_update_matches_reference(parts, dtype):
    x, cond = randn(2, 3, 5, 7).to(dtype), randn(2, 3, 5, 7, seed=1).to(dtype)
    uncond = randn(2, 3, 5, 7, seed=2).to(dtype) if "uncond" in parts else None
    old, noise = (randn(2, 3, 5, 7, seed=s).to(dtype) if "old" in parts else None for s in (3, 4))
    args = dict(guidance=4.5, a=0.7, b=0.3, e=-0.2, c=0.1)
    got = guided_update(x, cond, uncond, old=old, noise=noise, backend="triton", **args)
    want = guided_update_reference(*(t.double() if t is not None else None for t in (x, cond, uncond)),
                                   old=old.double() if old is not None else None,
                                   noise=noise.double() if noise is not None else None, **args)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_near(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, mask_kind", [
    ((2, 3, 37, 21, 24), "keys"), ((1, 2, 5, 40, 8), None), ((2, 1, 19, 19, 40), "full"),
])
def test_triton_attention_matches_math(shape, mask_kind, dtype):
    b, h, lq, lk, d = shape
    gen = torch.Generator().manual_seed(0)
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(b, 1, 1, lk, generator=gen) > 0.3
    elif mask_kind == "full":
        mask = torch.rand(b, h, lq, lk, generator=gen) > 0.5
    if mask is not None:
        mask[..., 0] = True
    q, k, v = randn(b, h, lq, d), randn(b, h, lk, d, seed=1), randn(b, h, lk, d, seed=2)
    check_against_reference(lambda q, k, v: attention_triton(q, k, v, mask),
                            lambda q, k, v: attention_math(q, k, v, mask), [q, k, v], dtype)


def test_triton_attention_is_a_registered_backend_that_ignores_padding():
    from limner.attention import attention
    q, k, v = randn(2, 2, 9, 16), randn(2, 2, 23, 16, seed=1), randn(2, 2, 23, 16, seed=2)
    mask = torch.ones(2, 1, 1, 23, dtype=torch.bool)
    mask[1, ..., 11:] = False
    out = attention(q, k, v, mask, backend="triton")
    assert torch.allclose(out[1], attention(q[1:], k[1:, :, :11], v[1:, :, :11], backend="triton")[0], atol=1e-5)


@pytest.mark.parametrize("lk, mask_kind", [(1, None), (7, "keys"), (10, "full"), (15, "broadcast"), (16, "keys"),
                                         (23, None)])
def test_sdpa_pads_few_keys_on_the_cpu_to_the_same_attention(lk, mask_kind):
    """Fewer than CPU_MIN_KEYS keys are padded with masked-out ones (torch's CPU flash kernel is
    ~2x slower below 16): values and gradients stay those of the unpadded math reference."""
    from limner.kernels import flash_attention
    b, h, lq, d = 2, 3, 37, 16
    gen = torch.Generator().manual_seed(0)
    mask = {
        None: None,
        "keys": torch.rand(b, 1, 1, lk, generator=gen) > 0.3,
        "full": torch.rand(b, h, lq, lk, generator=gen) > 0.5,
        "broadcast": torch.ones(b, 1, lq, 1, dtype=torch.bool),
    }[mask_kind]
    if mask is not None:
        mask[..., 0] = True
    q, k, v = (randn(*shape, seed=s).requires_grad_() for s, shape in
               enumerate([(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)]))
    if lk < flash_attention.CPU_MIN_KEYS:
        padded_k, padded_v, padded_mask = flash_attention.pad_keys(k, v, mask, flash_attention.CPU_MIN_KEYS)
        assert padded_k.shape[-2] == padded_mask.shape[-1] == flash_attention.CPU_MIN_KEYS
        assert not padded_mask[..., lk:].any() and torch.equal(padded_k[..., :lk, :], k)
    got, want = attention_sdpa(q, k, v, mask), attention_math(q, k, v, mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    out_grad = randn(*got.shape, seed=5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), out_grad), torch.autograd.grad(want, (q, k, v), out_grad)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    if mask is not None:  # an additive float bias is padded with -inf, not 0
        bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) + randn(*mask.shape, seed=6)
        torch.testing.assert_close(attention_sdpa(q, k, v, bias),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                                   atol=2e-6, rtol=1e-5)


def _cpu_kernel():
    from limner.kernels import cpu_attention
    if cpu_attention.KERNEL.module() is None:
        pytest.skip(f"limner's CPU attention kernel is not available here: {cpu_attention.KERNEL.failure}")
    return cpu_attention


@pytest.mark.parametrize("b, h, lq, lk, mask_kind", [
    (2, 4, 256, 256, None), (3, 2, 37, 23, "keys"), (1, 1, 1, 1, None), (2, 3, 5, 70, "keys"),
    (2, 1, 19, 10, "one_row"), (1, 2, 33, 16, "keys"),
])
def test_cpu_attention_matches_math_with_gradients(b, h, lq, lk, mask_kind):
    """limner's C++ CPU kernel against the float64 math reference: outputs and all gradients, over
    odd lengths (padding to 16 keys, query blocks of 4 with a remainder), masks and strided inputs."""
    cpu_attention = _cpu_kernel()
    gen = torch.Generator().manual_seed(0)
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(b, 1, 1, lk, generator=gen) > 0.4
        mask[..., 0] = True
    elif mask_kind == "one_row":  # one mask for the whole batch
        mask = torch.arange(lk).view(1, 1, 1, lk) < 3
    qkv = randn(b, lq, 3 * h * 16) * 2  # strided views of one projection, as the models make them
    q, k, v = (t.unflatten(-1, (h, 16)).transpose(1, 2) for t in qkv[:, :, :3 * h * 16].chunk(3, -1))
    if lk != lq:
        k, v = (randn(b, lk, 2 * h * 16, seed=1).chunk(2, -1)[i].unflatten(-1, (h, 16)).transpose(1, 2)
                for i in (0, 1))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    assert cpu_attention.fits(q, k, v, mask)
    got = cpu_attention.attention_cpu(q, k, v, mask)
    want = attention_math(*(t.double() for t in (q, k, v)), mask)
    torch.testing.assert_close(got.double(), want, atol=3e-6, rtol=1e-5)
    out_grad = randn(*got.shape, seed=5)
    grads = torch.autograd.grad(got, (q, k, v), out_grad)
    wants = torch.autograd.grad(want, (q, k, v), out_grad.double())
    for name, g, w in zip("qkv", grads, wants):
        torch.testing.assert_close(
            g.double(), w.double(), atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}"
        )


def test_cpu_attention_takes_only_its_inputs_and_auto_picks_it_for_them():
    cpu_attention = _cpu_kernel()
    from limner.attention import attention
    q, k = randn(2, 4, 9, 16), randn(2, 4, 11, 16, seed=1)
    key_mask, full_mask = torch.ones(2, 1, 1, 11, dtype=torch.bool), torch.ones(2, 4, 9, 11, dtype=torch.bool)
    assert preferred_backend(q, k, k, key_mask) == "cpu" and preferred_backend(q, k, k) == "cpu"
    for args in [
        (q.double(), k.double(), k.double(), None),
        (
            randn(2, 4, 9, 24),
            randn(2, 4, 11, 24),
        )
        * 1
        + (randn(2, 4, 11, 24),)
        + (None,),
        (q, k, k, full_mask),
        (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, k, None),
        (q, k, k, torch.ones(3, 1, 1, 11, dtype=torch.bool)),
        (q, k, k, torch.ones(2, 1, 1, 5, dtype=torch.bool)),
    ]:
        assert not cpu_attention.fits(*args) and preferred_backend(*args) == "sdpa"
        with pytest.raises(ValueError, match="attention_cpu takes float32 CPU q, k, v"):
            cpu_attention.attention_cpu(*args)
    torch.testing.assert_close(attention(q, k, k, key_mask), attention(q, k, k, key_mask, backend="math"),
                               atol=2e-6, rtol=1e-5)


def test_without_the_cpu_kernel_auto_says_why_once_and_uses_sdpa(monkeypatch):
    from limner.kernels import cpu_attention

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    from limner.kernels import _cpp

    kernel = _cpp.CppKernel("cpu_attention.cpp", ["forward", "backward"], cpu_attention.KERNEL.fallback)
    monkeypatch.setattr(cpu_attention, "KERNEL", kernel)
    monkeypatch.setattr(kernel, "build", no_compiler)
    monkeypatch.setattr(_cpp, "supported_cpu", lambda: True)
    q = randn(2, 4, 9, 16)
    with pytest.warns(RuntimeWarning, match=r"cpu_attention.cpp kernel could not be built \(RuntimeError: no C\+\+ "
                                            r"compiler found\); attention on the CPU uses torch's sdpa"):
        assert preferred_backend(q, q, q) == "sdpa"
    assert preferred_backend(q, q, q) == "sdpa"  # asked once: no second build, no second warning
    with pytest.raises(RuntimeError, match="not available here: RuntimeError: no C\\+\\+ compiler found"):
        cpu_attention.attention_cpu(q, q, q)


def _bf16_kernel():
    from limner.kernels import cpu_flash_bf16

    module = cpu_flash_bf16.KERNEL.module()
    if module is None or not module.available():
        pytest.skip(f"limner's bf16 CPU attention kernel is not available here: "
                    f"{cpu_flash_bf16.KERNEL.failure or cpu_flash_bf16.NO_GEMM}")
    return cpu_flash_bf16


def test_cpu_bf16_attention_runs_wherever_the_cpu_has_native_bf16():
    """The kernel's GEMMs run on AMX and on avx512_bf16 alone (AMD's Zen 4): `available` tries one
    rather than asking torch's could_pack, which answers for AMX only, so a CPU with either flag
    gets the kernel (CI's machines have one or the other)."""
    from limner.kernels import cpu_flash_bf16
    from limner.pipeline import native_bf16

    if not native_bf16():
        pytest.skip("this CPU has neither avx512_bf16 nor amx_bf16")
    module = cpu_flash_bf16.KERNEL.module()
    assert module is not None, cpu_flash_bf16.KERNEL.failure
    assert module.available()


@pytest.mark.parametrize("b, h, lq, lk, d", [(1, 2, 37, 64, 40), (2, 3, 100, 96, 8), (1, 1, 5, 544, 80),
                                             (2, 2, 129, 256, 160), (1, 1, 3, 32, 512)])
def test_cpu_bf16_attention_matches_a_float64_reference(b, h, lq, lk, d):
    """bf16 q, k, v laid out as the models lay them ([B, L, H, D] memory viewed as [B, H, L, D]),
    against float64 attention on the same numbers: within bf16 rounding, and as close as torch's
    own bf16 kernel gets (544 keys: three key blocks, the online softmax rescaling between them)."""
    kernel = _bf16_kernel()
    q, k, v = (randn(b, n, h, d, seed=i, scale=2.0).to(torch.bfloat16).transpose(1, 2)
               for i, n in enumerate((lq, lk, lk)))
    with torch.no_grad():
        assert kernel.fits(q, k, v)
        got = kernel.attention_cpu_bf16(q, k, v)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.dtype == torch.bfloat16 and got.shape == (b, h, lq, d)
    assert got.transpose(1, 2).is_contiguous()  # "b h l d -> b l (h d)" is a view
    err, torch_err = ((t.double() - want).abs().max().item() for t in (got, theirs))
    assert err <= 2 ** -7 * max(want.abs().max().item(), 1.0) and err <= 1.5 * torch_err + 1e-3, (err, torch_err)


def test_cpu_bf16_attention_takes_only_its_inputs_and_auto_picks_it_where_it_is_faster():
    """auto takes the kernel for bf16 self-attention over 2,048 keys or more without a mask or a
    gradient (SD's 64x64 latent pixels); 1,024 keys only without AMX (with AMX torch's kernel is as
    fast there); masks, float32, gradients and key counts off 32 stay on sdpa; misuse is named."""
    kernel = _bf16_kernel()
    long = randn(1, 2, 2048, 40).to(torch.bfloat16)
    with torch.no_grad():
        assert preferred_backend(long, long, long) == "cpu_bf16"
        short = randn(1, 2, 1024, 40).to(torch.bfloat16)
        assert kernel.fits(short, short, short)
        assert preferred_backend(short, short, short) == ("sdpa" if kernel.AMX else "cpu_bf16")
        mask = torch.ones(1, 1, 1, 2048, dtype=torch.bool)
        odd = randn(1, 2, 2047, 40).to(torch.bfloat16)
        for args in [(long, long, long, mask), (long.float(), long.float(), long.float(), None),
                     (long, odd, odd, None), (long[..., :39], long[..., :39], long[..., :39], None)]:
            assert not kernel.fits(*args) and preferred_backend(*args) != "cpu_bf16"  # (float32: cpu_f32's)
            with pytest.raises(ValueError, match="attention_cpu_bf16 takes bfloat16 CPU q, k, v"):
                kernel.attention_cpu_bf16(*args)
    grad = long.clone().requires_grad_()
    assert not kernel.fits(grad, long, long) and preferred_backend(grad, long, long) == "sdpa"


def test_cpu_bf16_attention_copies_keys_and_values_it_cannot_read_in_pairs():
    """Keys and values at an odd bf16 offset or with odd outer strides (views into a wider tensor)
    are read two bf16 at a time only after the kernel copies them (its Python check reads no
    data_ptr(), so that it holds in compiled graphs): the result equals the aligned inputs'."""
    kernel = _bf16_kernel()
    q, k, v = (randn(1, n, 3, 40, seed=i).to(torch.bfloat16).transpose(1, 2) for i, n in enumerate((50, 64, 64)))
    odd_k = torch.zeros(1, 64, 3, 41, dtype=torch.bfloat16)[..., 1:]  # starts one bf16 in: 2 bytes off
    odd_v = torch.zeros(1, 64, 3, 43, dtype=torch.bfloat16)[..., :40]  # rows 43 bf16 apart: odd strides
    odd_k.copy_(k.transpose(1, 2))
    odd_v.copy_(v.transpose(1, 2))
    odd_k, odd_v = odd_k.transpose(1, 2), odd_v.transpose(1, 2)
    assert odd_k.data_ptr() % 4 == 2 and odd_v.data_ptr() % 4 == 0 and odd_v.stride(2) % 2 == 1
    with torch.no_grad():
        assert kernel.fits(q, odd_k, odd_v)
        torch.testing.assert_close(kernel.attention_cpu_bf16(q, odd_k, odd_v), kernel.attention_cpu_bf16(q, k, v),
                                   atol=0, rtol=0)


def _f32_kernel():
    from limner.kernels import cpu_flash_f32

    if cpu_flash_f32.KERNEL.module() is None:
        pytest.skip(f"limner's float32 CPU attention kernel is not available here: {cpu_flash_f32.KERNEL.failure}")
    return cpu_flash_f32


@pytest.mark.parametrize("b, h, lq, lk, d", [(1, 2, 37, 64, 40), (2, 3, 100, 77, 24), (1, 1, 5, 300, 80),
                                             (2, 2, 129, 256, 160), (1, 1, 3, 1, 512), (1, 2, 260, 2100, 40)])
def test_cpu_f32_attention_matches_a_float64_reference(b, h, lq, lk, d):
    """float32 q, k, v laid out as the models lay them ([B, L, H, D] memory viewed as [B, H, L, D]),
    against float64 attention on the same numbers: as close as torch's own float32 kernel gets,
    over queries off whole vectors, one key, several key blocks (the online softmax rescaling
    between them) and the 256-query tasks taken against 2,048+ keys."""
    kernel = _f32_kernel()
    q, k, v = (randn(b, n, h, d, seed=i, scale=2.0).transpose(1, 2) for i, n in enumerate((lq, lk, lk)))
    with torch.no_grad():
        assert kernel.fits(q, k, v)
        got = kernel.attention_cpu_f32(q, k, v)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.dtype == torch.float32 and got.shape == (b, h, lq, d)
    assert got.transpose(1, 2).is_contiguous()  # "b h l d -> b l (h d)" is a view
    err, torch_err = ((t.double() - want).abs().max().item() for t in (got, theirs))
    assert err <= 4 * torch_err + 1e-6 and err <= 1e-5 * max(want.abs().max().item(), 1.0), (err, torch_err)


def test_cpu_f32_attention_takes_only_its_inputs_and_auto_picks_it_where_it_is_faster():
    """auto takes the kernel for float32 self-attention over 2,048+ keys at head dims 24-48 and for
    cross-attention of 1,024+ queries to a few keys up to head dim 80, without a mask or a gradient;
    where torch's was as fast (with AMX: 64-wide heads, 1,024 pixels) or faster (64 queries) it
    keeps torch's; head dim 16 keeps limner's other kernel; masks, bf16 and gradients stay on sdpa;
    misuse is named."""
    kernel = _f32_kernel()
    long = randn(1, 2, 2048, 40)
    text = randn(1, 2, 77, 80)
    with torch.no_grad():
        assert preferred_backend(long, long, long) == "cpu_f32"
        assert preferred_backend(randn(1, 2, 1024, 80), text, text) == "cpu_f32"
        xeon_only = [(randn(1, 2, 1024, 40),) * 2, (randn(1, 2, 2048, 64),) * 2, (randn(1, 2, 512, 80), text)]
        for q, k in xeon_only + [(randn(1, 2, 64, 160),) * 2]:
            amd_picks = "cpu_f32" if q.shape[2] >= 256 else "sdpa"
            assert kernel.fits(q, k, k) and preferred_backend(q, k, k) == ("sdpa" if kernel.AMX else amd_picks)
        assert preferred_backend(*(randn(1, 2, 2048, 16),) * 3) != "cpu_f32"
        mask = torch.ones(1, 1, 1, 2048, dtype=torch.bool)
        for args in [(long, long, long, mask), (long.bfloat16(), long.bfloat16(), long.bfloat16(), None),
                     (long, long[:, :, :0], long[:, :, :0], None), (long, long[..., :39], long[..., :39], None)]:
            assert not kernel.fits(*args) and preferred_backend(*args) != "cpu_f32"
            with pytest.raises(ValueError, match="attention_cpu_f32 takes float32 CPU q, k, v"):
                kernel.attention_cpu_f32(*args)
    grad = long.clone().requires_grad_()
    assert not kernel.fits(grad, long, long) and preferred_backend(grad, long, long) == "sdpa"


def cpu_kernel_module(name: str):
    """limner.kernels.<name> (the module: the package's attribute of that name is the function),
    skipping the test where its C++ CPU kernel cannot be built here."""
    import sys
    module = sys.modules[f"limner.kernels.{name}"]
    if module.CPU_KERNEL.module() is None:
        pytest.skip(f"limner's CPU {name} kernel is not available here: {module.CPU_KERNEL.failure}")
    return module


@pytest.mark.parametrize("shape, groups, params", [
    ((4, 32, 9, 7), 8, "w b scale shift"), ((3, 48, 5, 7), 16, "w b"), ((2, 16, 1, 1), 4, "scale shift"),
    ((2, 64, 6, 6), 32, "b scale"), ((1, 32, 3, 5), 1, ""),
])
def test_cpu_group_norm_silu_matches_the_reference_with_gradients(shape, groups, params):
    """The C++ channels-last GroupNorm + FiLM + SiLU against the float64 reference: output and the
    gradients of every input, over odd spatial sizes, group counts and parameter subsets."""
    module = cpu_kernel_module("group_norm_silu")
    n, c = shape[:2]
    x = (randn(*shape) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    given = {"w": randn(c, seed=1), "b": randn(c, seed=2), "scale": randn(n, c, seed=3), "shift": randn(n, c, seed=4)}
    w, b, sc, sh = (given[k].requires_grad_() if k in params.split() else None for k in ("w", "b", "scale", "shift"))
    inputs = [t for t in (x, w, b, sc, sh) if t is not None]
    assert module.cpu_kernel_fits(x, w, b, sc, sh)
    got = module.GroupNormSiLUCPU.apply(x, groups, w, b, 1e-5, sc, sh)
    assert got.is_contiguous(memory_format=torch.channels_last)
    want = group_norm_silu_reference(*(t.double() if t is not None else None for t in (x,)), groups,
                                     *(t.double() if t is not None else None for t in (w, b)), 1e-5,
                                     *(t.double() if t is not None else None for t in (sc, sh)))
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-5)
    out_grad = randn(*shape, seed=5)
    for g, r in zip(torch.autograd.grad(got, inputs, out_grad), torch.autograd.grad(want, inputs, out_grad.double())):
        torch.testing.assert_close(g.double(), r.double(), atol=2e-4 * r.abs().max().item(), rtol=1e-4)


def test_group_norm_silu_takes_the_cpu_kernel_only_for_channels_last_float32(monkeypatch):
    module = cpu_kernel_module("group_norm_silu")
    taken = []
    real = module.GroupNormSiLUCPU.apply
    monkeypatch.setattr(module.GroupNormSiLUCPU, "apply", lambda *a: taken.append(a[0].shape) or real(*a))
    cl = randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    w = randn(32)
    group_norm_silu(cl, 8, w)
    assert taken == [cl.shape]
    for x in (cl.contiguous(), randn(2, 24, 4, 4).contiguous(memory_format=torch.channels_last), cl.double()):
        group_norm_silu(x, 8, w.to(x.dtype) if x.shape[1] == 32 else None)
    group_norm_silu(cl, 8, w, backend="eager")
    monkeypatch.setenv("LIMNER_KERNELS", "eager")
    group_norm_silu(cl, 8, w)
    assert taken == [cl.shape]


@pytest.mark.parametrize("shape", [(3, 5, 38), (7, 2), (2, 1, 3, 66), (4, 32), (2, 9, 1026)])
def test_cpu_geglu_matches_the_reference_with_gradients(shape):
    """The C++ GEGLU (float32) against the float64 reference: output and input gradient over odd
    widths (a masked tail; 16-wide vectors), gates from -12 to 12 (erfc's tail on both sides); no
    further from float64 than eager float32 is, give or take 1e-6 of the largest value."""
    module = cpu_kernel_module("geglu")
    x = randn(*shape, scale=4.0).requires_grad_()
    dy = randn(*shape[:-1], shape[-1] // 2, seed=1)
    x64 = x.detach().double().requires_grad_()
    want = geglu_reference(x64)
    (want_grad,) = torch.autograd.grad(want, x64, dy.double())
    xe = x.detach().requires_grad_()
    eager = geglu_reference(xe)
    (eager_grad,) = torch.autograd.grad(eager, xe, dy)
    got = module.GEGLUCPU.apply(x)
    (got_grad,) = torch.autograd.grad(got, x, dy)
    for name, g, e, w in (("output", got, eager, want), ("gradient", got_grad, eager_grad, want_grad)):
        err, eager_err = (g.double() - w).abs().max().item(), (e.double() - w).abs().max().item()
        assert err <= eager_err + 1e-6 * w.abs().max().item(), f"{name}: {err:.3g} against eager's {eager_err:.3g}"


def test_cpu_geglu_gradient_is_differentiable_again():
    """Under create_graph (a gradient penalty) the backward is autograd's through the reference: the
    second derivative equals the reference's, for a non-contiguous input too (transposed strides:
    the kernel reads a contiguous copy, the second derivative must still reach the input)."""
    module = cpu_kernel_module("geglu")
    for base in (randn(3, 10, scale=2.0), randn(10, 3, scale=2.0).t()):
        leaf, leaf_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
        x, xr = leaf + 0, leaf_ref + 0  # in the leaves' layout: non-contiguous for the transposed one
        assert x.is_contiguous() == base.is_contiguous()
        (g,) = torch.autograd.grad(module.GEGLUCPU.apply(x).square().sum(), leaf, create_graph=True)
        (gr,) = torch.autograd.grad(geglu_reference(xr).square().sum(), leaf_ref, create_graph=True)
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(g.sum(), leaf)[0], torch.autograd.grad(gr.sum(), leaf_ref)[0],
                                   atol=1e-5, rtol=1e-5)


def test_geglu_takes_the_cpu_kernel_only_for_float32(monkeypatch):
    module = cpu_kernel_module("geglu")
    taken = []
    real = module.GEGLUCPU.apply
    monkeypatch.setattr(module.GEGLUCPU, "apply", lambda x: taken.append(x.dtype) or real(x))
    x = randn(2, 3, 8)
    torch.testing.assert_close(geglu(x), geglu_reference(x), atol=1e-6, rtol=1e-6)
    assert taken == [torch.float32]
    geglu(x.double())
    geglu(x.bfloat16())
    geglu(x[:, :, :0])
    geglu(x, backend="eager")
    monkeypatch.setenv("LIMNER_KERNELS", "eager")
    geglu(x)
    assert taken == [torch.float32]


def profiled_ops(fn) -> set[str]:
    """The names of the ops `fn()` ran, as torch's profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_kernels_import_without_torch_dynamo():
    """Declaring the C++ kernels' custom ops and trace constants imports no torch._dynamo (nor its
    sympy): a first version's torch.compiler.assume_constant_result at import cost every `limner
    sample` start 1.2 s, and the imported dynamo broke freed_memory_kept's page reuse."""
    import subprocess
    import sys

    code = ("import sys, limner.pipeline, limner.sampling, limner.kernels, limner.attention; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sympy' or m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_compiled_graphs_call_limner_cpu_kernels_and_match_eager():
    """Inside torch.compile limner's C++ CPU kernels are custom ops of the graph (kernels/_cpp.py:
    opaque to dynamo, inductor fuses around them), where they used to give way to inductor's code:
    a compiled function through the Winograd convolution, GroupNorm + SiLU, the head-dim-16
    attention and GEGLU calls each of them forward and backward, and a compiled no-grad one the
    float32 flash attention and, where the CPU runs it, the bf16 one through the attention
    dispatcher, with eager's values and gradients; one graph each (fullgraph=True)."""
    from limner.attention import attention
    from limner.kernels import conv2d, cpu_attention, cpu_flash_bf16, cpu_flash_f32

    winograd_kernel()
    cpu_kernel_module("group_norm_silu")
    cpu_kernel_module("geglu")
    for kernel in (cpu_attention.KERNEL, cpu_flash_f32.KERNEL):
        if kernel.module() is None:
            pytest.skip(f"{kernel.source.name} is not available here: {kernel.failure}")
    torch._dynamo.reset()

    def block(x, w, gn_w, gn_b):
        h = group_norm_silu(conv2d(x, w, None, padding=1), 8, gn_w, gn_b)  # [2, 32, 9, 7] channels-last
        q = h.flatten(2).transpose(1, 2).unflatten(2, (2, 16)).transpose(1, 2)  # [2, 2 heads, 63, 16]
        return geglu(cpu_attention.attention_cpu(q, 0.5 * q, -q))  # [2, 2, 63, 8] (dynamo traces no apply(q, q, q))

    leaves = [randn(2, 32, 9, 7).contiguous(memory_format=torch.channels_last), randn(32, 32, 3, 3, seed=1) * 0.1,
              1 + 0.1 * randn(32, seed=2), 0.1 * randn(32, seed=3)]
    dy = randn(2, 2, 63, 8, seed=4)
    runs = {}
    for name, fn in (("eager", block), ("compiled", torch.compile(block, dynamic=False, fullgraph=True))):
        inputs = [t.clone().requires_grad_() for t in leaves]

        def step(fn=fn, inputs=inputs, name=name):
            out = fn(*inputs)
            runs[name] = (out, torch.autograd.grad(out, inputs, dy))
        step()  # (compiling, for the compiled one)
        ran = profiled_ops(step)
    assert {f"limner::cpu_{op}" for op in ("winograd_forward_fused", "winograd_weight_grad", "group_norm_silu_forward",
                                           "group_norm_silu_backward", "attention_forward", "attention_backward",
                                           "geglu_forward", "geglu_backward")} <= ran
    for got, want in zip([runs["compiled"][0], *runs["compiled"][1]], [runs["eager"][0], *runs["eager"][1]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    q, k = randn(1, 2, 300, 40, seed=5), randn(1, 2, 77, 40, seed=6)
    flash = torch.compile(cpu_flash_f32.attention_cpu_f32, dynamic=False, fullgraph=True)
    with torch.no_grad():
        flash(q, k, k)
        ran = profiled_ops(lambda: runs.update(flash=flash(q, k, k)))
        assert "limner::cpu_flash_f32_forward" in ran
        torch.testing.assert_close(runs["flash"], cpu_flash_f32.attention_cpu_f32(q, k, k), atol=1e-6, rtol=1e-5)
        # bf16 attention through the dispatcher: limner's kernel in the graph where the CPU runs it
        # (its fits used to read data_ptr(), which broke the graph), torch's sdpa elsewhere
        q, k = q.bfloat16(), randn(1, 2, 2048, 40, seed=7).bfloat16()
        dispatched = torch.compile(lambda q, k: attention(q, k, k), dynamic=False, fullgraph=True)
        dispatched(q, k)
        ran = profiled_ops(lambda: runs.update(bf16=dispatched(q, k)))
        assert ("limner::cpu_flash_bf16_forward" in ran) == cpu_flash_bf16.runs()
        torch.testing.assert_close(runs["bf16"], attention(q, k, k, backend="sdpa"), atol=2e-2, rtol=2e-2)


# --- the backend switch and the attention preference table -------------------------------------

def test_backend_switch_names_bad_values(monkeypatch):
    x = randn(2, 3, 6)
    with pytest.raises(ValueError, match="geglu: unknown backend 'fast'; valid: auto, triton, eager"):
        geglu(x, backend="fast")
    with pytest.raises(ValueError, match="dtype torch.float64 has no kernel"):
        geglu(x.double(), backend="triton")
    with pytest.raises(ValueError, match=r"gated_residual: gate of shape \(2, 5\), expected \[B, D\] = \[2, 6\]"):
        gated_residual(x, randn(2, 5), x)
    monkeypatch.setenv("LIMNER_KERNELS", "fastest")
    with pytest.raises(ValueError, match="LIMNER_KERNELS='fastest' is not a backend"):
        geglu(x)
    monkeypatch.setenv("LIMNER_KERNELS", "eager")  # forces the reference even where triton is asked for
    assert torch.equal(geglu(x.double(), backend="triton"), geglu_reference(x.double()))
    q = randn(1, 2, 3, 4)
    assert torch.equal(attention_triton(q, q, q), attention_math(q, q, q))


def test_preference_table_measures_once_picks_the_fastest_and_persists(tmp_path):
    path = tmp_path / "attention-gpu.json"
    costs = {"sdpa": 2.0, "xformers": 3.0, "triton": 1.0}
    calls = []

    def timer(run):
        calls.append(run())
        return costs[calls[-1]]

    def broken():
        raise RuntimeError("head dim unsupported")

    table = PreferenceTable(path, timer)
    runs = {name: (lambda name=name: name) for name in costs} | {"math": broken}
    assert table.measure("k", runs) == "triton" and table.best("k") == "triton"
    assert sorted(calls) == sorted(costs)  # every runnable backend timed once; the broken one skipped
    assert json.loads(path.read_text())["k"] == costs

    def no_timing(run):
        raise AssertionError("a known shape must not be measured again")

    assert PreferenceTable(path, no_timing).best("k") == "triton"
    path.write_text("{not json")
    assert PreferenceTable(path, no_timing).best("k") is None  # a corrupt cache is re-measured, not fatal


def test_auto_attention_measures_every_available_backend_and_takes_the_fastest():
    q, k, v = randn(1, 2, 9, 8), randn(1, 2, 11, 8, seed=1), randn(1, 2, 11, 8, seed=2)

    def wall_clock(run):
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    table = PreferenceTable(None, wall_clock)
    choice = preferred_backend(q, k, v, None, table=table)
    timings = table.timings[shape_key(q, k, None)]
    assert {"sdpa", "triton", "math"} <= set(timings) and choice == min(timings, key=timings.get)
    assert preferred_backend(q, k, v, None, table=table) == choice  # remembered


# --- whole models: the same outputs with every kernel fused ----------------------------------

def text(batch, dim=8, length=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    return TextEmbedding(torch.randn(batch, length, dim, generator=gen), mask, torch.randn(batch, dim, generator=gen))


def run_both(monkeypatch, fn):
    """fn() under LIMNER_KERNELS=eager and =triton (attention: math vs triton)."""
    results = []
    for kernels, attn in (("eager", "math"), ("triton", "triton")):
        monkeypatch.setenv("LIMNER_KERNELS", kernels)
        monkeypatch.setenv("LIMNER_ATTENTION", attn)
        torch.manual_seed(0)
        results.append(fn())
    return results


@pytest.mark.parametrize("name, options", [
    ("unet", {"channels": 16, "mults": [1, 2], "blocks": 1, "attention_levels": [1], "groups": 8}),
    ("dit", {"dim": 32, "depth": 1, "patch": 4}),
])
def test_denoisers_agree_with_fused_kernels(monkeypatch, name, options):
    def forward_backward():
        model = limner.create("denoisers", name, context_dim=8, image_size=8, **options)
        for p in model.parameters():  # wake zero-initialised layers so every path carries signal
            p.data += 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        out = model(randn(2, 3, 8, 8), torch.tensor([0.3, 3.0]), text(2))
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        return out, torch.cat([g.flatten() for g in grads])

    (out_e, grad_e), (out_t, grad_t) = run_both(monkeypatch, forward_backward)
    torch.testing.assert_close(out_t, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_t, grad_e, rtol=1e-3, atol=1e-5)


def test_stylegan2_generator_and_discriminator_with_r1_agree_with_fused_kernels(monkeypatch):
    def g_and_d():
        g = limner.create("generators", "stylegan2", context_dim=8, channels=3, image_size=8, channel_base=64,
                          channel_max=8, z_dim=8, w_dim=8, text_dim=8, mapping_layers=2)
        d = limner.create("discriminators", "stylegan2", context_dim=8, channels=3, image_size=8, channel_base=64,
                          channel_max=8, cmap_dim=4)
        cond = text(2)
        image = g(randn(2, 8), cond, generator=torch.Generator().manual_seed(0))
        real = randn(2, 3, 8, 8, seed=3).requires_grad_()
        (grad_real,) = torch.autograd.grad(d(real, cond).sum(), real, create_graph=True)
        r1 = grad_real.square().sum()
        params = list(d.parameters())  # the last layer's bias does not reach the gradient: allow_unused
        d_grads = torch.autograd.grad(r1, params, allow_unused=True)
        return image, r1, torch.cat([(t if t is not None else torch.zeros_like(p)).flatten()
                                     for t, p in zip(d_grads, params)])

    eager, fused = run_both(monkeypatch, g_and_d)
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_vae_agrees_with_fused_kernels(monkeypatch):
    def encode_decode():
        vae = limner.create("generators", "vae", context_dim=8, channels=3, image_size=8, width=16, downs=1)
        mean, logvar = vae.encode(randn(2, 3, 8, 8), text(2))
        return vae.decode(mean, text(2)), logvar

    for got, want in zip(*reversed(run_both(monkeypatch, encode_decode))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

