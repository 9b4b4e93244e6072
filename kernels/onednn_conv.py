"""A 2-D convolution whose weight is packed for oneDNN once, not at every call (bf16 CPU inference).

F.conv2d hands oneDNN the weight in PyTorch's plain [Cout, Cin, kh, kw] layout, and oneDNN
reorders it into its blocked layout on every call. Where the image is small and the weight
large (Stable Diffusion's 1280-channel 3x3 convolutions at 8x8 and 16x16 latent pixels) that
reorder is most of the call: the weight is read and written once more than the convolution
reads it. `conv2d_packed` keeps the reordered weight (mkldnn's `_reorder_convolution_weight`,
the packing inductor's freezing does for compiled graphs; the layout depends on the input's
shape, so the last shape's packing is kept) and calls oneDNN's convolution on it: the same
algorithm on the same numbers, so the same outputs as F.conv2d (tests/test_kernels.py). Measured
per shape: benchmarks/results/cpu-kernel-measurements.md.

It takes bfloat16 CPU inputs in channels-last memory without autograd (`fits`); float32 stays
on F.conv2d (its packed path did not keep float32's accuracy when measured here), as does a
torch.compile trace, which packs for itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available()


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> bool:
    """Whether conv2d_packed takes these: bf16 CPU tensors (bias too), a 4-D channels-last input,
    numeric padding, no gradient, outside a torch.compile trace."""
    return (_ONEDNN and not torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.ndim == 4
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
            and (bias is None or bias.dtype == x.dtype) and not isinstance(padding, str)
            and x.is_contiguous(memory_format=torch.channels_last))


class Packed:
    """One convolution's weight as its kernel last prepared it (oneDNN's blocked layout for an input
    shape, or Winograd's transformed tiles: kernels/cpu_winograd.py), kept with what it was made
    from: another input shape, kernel or an in-place change to the weight prepares it again."""

    def __init__(self):
        self.key, self.weight = None, None

    def prepared(self, key: tuple, make) -> torch.Tensor:
        """The weight kept for `key`, or make() kept in its place."""
        if key != self.key:
            self.weight, self.key = None, None  # the old one freed before the new one is made
            self.weight, self.key = make(), key
        return self.weight

    def get(self, x: torch.Tensor, weight: torch.Tensor, padding, stride, dilation, groups: int) -> torch.Tensor:
        return self.prepared(("onednn", tuple(x.shape), weight.data_ptr(), weight._version),
                             lambda: torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation,
                                                                                 groups, list(x.shape)))


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def conv2d_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                  groups: int, packed: Packed) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) with the weight packed once by
    `packed`; F.conv2d itself where the inputs do not fit."""
    if not fits(x, weight, bias, padding):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    padding, stride, dilation = (_pair(v) for v in (padding, stride, dilation))
    w = packed.get(x, weight, padding, stride, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, padding, stride, dilation, groups, "none", [], "")
