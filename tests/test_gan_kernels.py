"""The GAN ops' eager references against independent computations (scipy, explicit loops)."""
import math

import numpy as np
import pytest
import torch
from scipy import signal

from limner.kernels import bias_act, downsample2d, minibatch_std, setup_filter, upfirdn2d, upsample2d
from limner.kernels.bias_act import ACTIVATIONS


@pytest.mark.parametrize("act,expected", [
    ("linear", lambda x: x),
    ("relu", lambda x: np.sqrt(2) * np.maximum(x, 0)),
    ("lrelu", lambda x: np.sqrt(2) * np.where(x > 0, x, 0.2 * x)),
    ("tanh", np.tanh),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    ("softplus", lambda x: np.log1p(np.exp(x))),
    ("swish", lambda x: np.sqrt(2) * x / (1 + np.exp(-x))),
])
def test_bias_act_matches_formula_with_default_gain(act, expected):
    x, b = torch.randn(3, 5, 7, 2, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = bias_act(x, b, act=act)
    want = expected((x + b[None, :, None, None]).numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_bias_act_dim_alpha_gain_clamp():
    x, b = torch.randn(4, 6, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    got = bias_act(x, b, dim=2, act="lrelu", alpha=0.1, gain=3.0, clamp=0.5)
    y = x + b
    want = (torch.where(y > 0, y, 0.1 * y) * 3.0).clamp(-0.5, 0.5)
    torch.testing.assert_close(got, want)
    assert got.abs().max() <= 0.5 and (got.abs() == 0.5).any()


@pytest.mark.parametrize("act", ["lrelu", "swish", "softplus", "tanh"])
def test_bias_act_second_derivative(act):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, b: bias_act(x, b, act=act), (x, b))


def test_bias_act_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*lrelu"):
        bias_act(torch.zeros(2, 3), act="gelu")
    with pytest.raises(ValueError, match=r"bias of shape \(4,\) does not fit dim 1"):
        bias_act(torch.zeros(2, 3), torch.zeros(4))
    assert set(ACTIVATIONS) >= {"linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"}


def _scipy_upfirdn2d(x: np.ndarray, taps: np.ndarray, up: int, down: int) -> np.ndarray:
    """Separable upfirdn along H then W with scipy's 1-D upfirdn (full convolution)."""
    y = np.apply_along_axis(lambda r: signal.upfirdn(taps, r, up, down), 2, x)
    return np.apply_along_axis(lambda r: signal.upfirdn(taps, r, up, down), 3, y)


@pytest.mark.parametrize("up,down,taps", [(1, 1, [1, 3, 3, 1]), (2, 1, [1, 3, 3, 1]), (1, 2, [1, 2, 1]),
                                          (3, 2, [1, 4, 6, 4, 1])])
def test_upfirdn2d_matches_scipy_full_convolution(up, down, taps):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    f = torch.tensor(taps, dtype=torch.float64)
    # scipy upsamples to (n - 1) * up + 1 samples; ours to n * up, so drop the up - 1 trailing zeros
    pad0, pad1 = len(taps) - 1, len(taps) - 1 - (up - 1)
    got = upfirdn2d(x, f, up=up, down=down, padding=[pad0, pad1, pad0, pad1])
    want = _scipy_upfirdn2d(x.numpy(), np.asarray(taps, dtype=np.float64), up, down)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_upfirdn2d_2d_filter_is_a_true_convolution():
    x, f = torch.randn(1, 2, 6, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    got = upfirdn2d(x, f, padding=[3, 3, 2, 2])
    want = np.stack([signal.convolve2d(x[0, c].numpy(), f.numpy(), mode="full") for c in range(2)])
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-10, atol=1e-10)
    flipped = upfirdn2d(x, f.flip([0, 1]), padding=[3, 3, 2, 2], flip_filter=True)
    torch.testing.assert_close(flipped, got)


def test_negative_padding_crops_and_gain_scales():
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(upfirdn2d(x, None, padding=[-1, -2, -3, 0]), x[:, :, 3:, 1:6])
    torch.testing.assert_close(upfirdn2d(x, None, gain=4.0), 4 * x)


def test_resampling_keeps_a_constant_image_and_halves_or_doubles_size():
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and math.isclose(float(f.sum()), 1.0, rel_tol=1e-6)
    x = torch.full((2, 3, 8, 8), 0.7)
    up, down = upsample2d(x, f), downsample2d(x, f)
    assert up.shape == (2, 3, 16, 16) and down.shape == (2, 3, 4, 4)
    torch.testing.assert_close(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 0.7))
    torch.testing.assert_close(down[:, :, 1:-1, 1:-1], torch.full_like(down[:, :, 1:-1, 1:-1], 0.7))


def test_upfirdn2d_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        upfirdn2d(torch.zeros(3, 4, 4), None)
    with pytest.raises(ValueError, match="padding must be"):
        upfirdn2d(torch.zeros(1, 1, 4, 4), None, padding=[1, 2, 3])


def test_minibatch_std_matches_an_explicit_loop():
    n, c, h, w, g, f = 6, 4, 3, 5, 3, 2
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    got = minibatch_std(x, group_size=g, num_channels=f)
    assert got.shape == (n, c + f, h, w)
    torch.testing.assert_close(got[:, :c], x)
    groups = n // g
    for i in range(n):
        members = x[[j for j in range(n) if j % groups == i % groups]]  # sample i's group
        for k in range(f):
            part = members[:, k * (c // f):(k + 1) * (c // f)]
            std = (part.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
            torch.testing.assert_close(got[i, c + k], torch.full((h, w), float(std), dtype=torch.float64))


def test_minibatch_std_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="batch 6 must divide into groups of 4"):
        minibatch_std(torch.zeros(6, 2, 2, 2), group_size=4)
