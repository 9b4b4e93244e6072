"""Fused kernels against eager PyTorch and torch.compile of the same reference, at
diffusion- and GAN-typical shapes, plus the copy bandwidth they are judged against.
CUDA only (the Triton interpreter's timings mean nothing); `limner bench` renders the table.

Each benchmark records the bytes the op must move at minimum (inputs read once, outputs
written once), so the table can show achieved GB/s as a share of the measured copy rate.
"""
import functools

import pytest
import torch

from limner.kernels import (
    adaln_modulate,
    bias_act,
    gated_residual,
    geglu,
    group_norm_silu,
    guided_update,
    setup_filter,
    upfirdn2d,
)
from limner.kernels.adaln import adaln_modulate_reference, gated_residual_reference
from limner.kernels.bias_act import bias_act_reference
from limner.kernels.geglu import geglu_reference
from limner.kernels.group_norm_silu import group_norm_silu_reference
from limner.kernels.sampler_update import guided_update_reference
from limner.kernels.upfirdn2d import upfirdn2d_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")
DTYPE = torch.bfloat16


@functools.lru_cache(maxsize=1)
def _filter() -> torch.Tensor:
    return setup_filter([1, 3, 3, 1], device="cuda")


def _t(*shape, dtype=DTYPE, grad=False):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def _size(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ops():
    """name -> (make inputs, fused fn, reference fn, bytes moved by one forward given inputs and output)."""
    return {
        # UNet ResBlock at SD-like latent size: [8, 320, 64, 64], 32 groups, FiLM
        "group_norm_silu": (lambda: (_t(8, 320, 64, 64), _t(320), _t(320), _t(8, 320), _t(8, 320)),
                            lambda x, w, b, sc, sh: group_norm_silu(x, 32, w, b, 1e-5, sc, sh, backend="triton"),
                            lambda x, w, b, sc, sh: group_norm_silu_reference(x, 32, w, b, 1e-5, sc, sh)),
        # DiT-XL/2 token tensor: [8, 1024 tokens, 1152]
        "adaln_modulate": (lambda: (_t(8, 1024, 1152), _t(8, 1152), _t(8, 1152)),
                           lambda x, sh, sc: adaln_modulate(x, sh, sc, backend="triton"), adaln_modulate_reference),
        "gated_residual": (lambda: (_t(8, 1024, 1152), _t(8, 1152), _t(8, 1024, 1152)),
                           lambda x, g, y: gated_residual(x, g, y, backend="triton"), gated_residual_reference),
        # SD feed-forward: [8, 4096 tokens, 2 x 1280]
        "geglu": (lambda: (_t(8, 4096, 2560),), lambda x: geglu(x, backend="triton"), geglu_reference),
        # StyleGAN2 discriminator/generator layer at 64x64 with 256 channels, batch 32
        "bias_act": (lambda: (_t(32, 256, 64, 64), _t(256)),
                     lambda x, b: bias_act(x, b, act="lrelu", clamp=256.0, backend="triton"),
                     lambda x, b: bias_act_reference(x, b, act="lrelu", clamp=256.0)),
        "upfirdn2d_up2": (lambda: (_t(32, 256, 32, 32),),
                          lambda x: upfirdn2d(x, _filter(), up=2, padding=[2, 1, 2, 1], gain=4, backend="triton"),
                          lambda x: upfirdn2d_reference(x, _filter(), up=2, padding=[2, 1, 2, 1], gain=4)),
        # DPM-Solver++(2M) step with guidance on a [16, 4, 128, 128] latent batch, float32 like the sampler
        "guided_update": (lambda: tuple(_t(16, 4, 128, 128, dtype=torch.float32) for _ in range(4)),
                          lambda x, c, u, o: guided_update(x, c, u, 7.5, 0.8, 0.3, o, -0.1, backend="triton"),
                          lambda x, c, u, o: guided_update_reference(x, c, u, 7.5, 0.8, 0.3, o, -0.1)),
    }


TRAINABLE = ("group_norm_silu", "adaln_modulate", "gated_residual", "geglu", "bias_act", "upfirdn2d_up2")
IMPLS = ("eager", "compile", "triton")


def _fn(op: str, impl: str):
    _, fused, reference = _ops()[op]
    if impl == "triton":
        return fused
    return torch.compile(reference, dynamic=False) if impl == "compile" else reference


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(_ops()))
def test_kernel_forward(benchmark, op, impl, sync):
    make = _ops()[op][0]
    inputs, fn = make(), _fn(op, impl)
    with torch.no_grad():
        out = _outputs(fn(*inputs))
        moved = _size(*inputs) + _size(*out)

        def run():
            fn(*inputs)
            sync()

        run()
        benchmark(run)
    benchmark.extra_info.update(group="kernel", op=op, impl=impl, pass_="forward", bytes=moved,
                                shape=list(inputs[0].shape), dtype=str(inputs[0].dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", TRAINABLE)
def test_kernel_forward_backward(benchmark, op, impl, sync):
    make = _ops()[op][0]
    inputs = [t.requires_grad_() for t in make()]
    fn = _fn(op, impl)
    out = fn(*inputs)
    dy = torch.randn_like(out)
    # forward reads inputs, writes out; backward reads dy (+ inputs again) and writes every grad
    moved = 2 * _size(*inputs) + 2 * _size(out) + _size(*inputs)

    def run():
        torch.autograd.grad(fn(*inputs), inputs, dy)
        sync()

    run()
    benchmark(run)
    benchmark.extra_info.update(group="kernel", op=op, impl=impl, pass_="forward+backward", bytes=moved,
                                shape=list(inputs[0].shape), dtype=str(inputs[0].dtype))


def test_copy_bandwidth(benchmark, sync):
    """The yardstick: a device-to-device copy of 512 MiB."""
    src = torch.empty(256 * 2**20, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync()

    run()
    benchmark(run)
    benchmark.extra_info.update(group="copy", bytes=2 * _size(src))
