"""A linear layer over many rows, run on the CPU as a 1x1 convolution: oneDNN's JIT instead of
the BLAS sgemm behind F.linear.

x [..., Cin] with R rows is viewed, without a copy, as a channels-last image [1, Cin, 1, R];
conv2d with the weight as a [Cout, Cin, 1, 1] kernel gives a channels-last [1, Cout, 1, R],
whose memory is exactly y [..., Cout]. Same products, same sums; autograd runs oneDNN's
convolution backward for dx, dW and db.

On the AMD CPU it was measured on, oneDNN's JIT beats MKL's sgemm once the work is large enough:
hence oneDNN from MIN_ROWS rows and MIN_MACS multiply-adds on (the measurements:
benchmarks/results/cpu-kernel-measurements.md). Intel CPUs, whose MKL runs its AVX-512 kernels, are not measured:
LIMNER_KERNELS=eager (or backend="eager") keeps F.linear.
"""
import platform

import torch
import torch.nn.functional as F

from ._backend import forced_eager

BACKENDS = ("auto", "onednn", "eager")
MIN_ROWS, MIN_MACS = 1024, 1 << 23
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_ONEDNN = torch.backends.mkldnn.is_available()  # asked once: torch.compile cannot trace the call


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) as a 1x1 convolution over a channels-last view of x's rows."""
    cin = x.shape[-1]
    image = x.reshape(1, 1, -1, cin).permute(0, 3, 1, 2)  # [1, Cin, 1, R], channels-last strides
    y = F.conv2d(image, weight[:, :, None, None], bias)  # [1, Cout, 1, R], channels-last
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """F.linear, routed through oneDNN for float32 CPU inputs of at least MIN_ROWS rows and MIN_MACS
    multiply-adds on x86."""
    if backend not in BACKENDS:
        raise ValueError(f"linear: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "eager" or forced_eager():
        return F.linear(x, weight, bias)
    fits = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and _ONEDNN
    if backend == "onednn":
        if not fits:
            raise ValueError(f"linear: backend 'onednn' takes float32 CPU tensors with oneDNN available, got "
                             f"{x.dtype} on {x.device.type}; use backend='eager' or 'auto'")
        return linear_onednn(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if fits and _X86 and rows >= MIN_ROWS and rows * weight.numel() >= MIN_MACS:
        return linear_onednn(x, weight, bias)
    return F.linear(x, weight, bias)
