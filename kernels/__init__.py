"""Fused ops and attention implementations (torch and triton only; nothing from limner).

Each op has a Triton kernel, an eager reference with the same semantics and a
`backend="auto"|"triton"|"eager"` argument ('auto': Triton on CUDA); LIMNER_KERNELS=eager
forces the reference everywhere, LIMNER_KERNELS=triton the kernels (on CPU under
TRITON_INTERPRET=1). minibatch_std has only its reference. `linear` is F.linear routed through
oneDNN on the CPU (onednn_linear.py): there the BLAS sgemm is the slow path; `conv2d_packed`
packs a bf16 convolution's weight for oneDNN once instead of at every call (onednn_conv.py);
`linear_geglu` runs a GEGLU's projection and gate as two oneDNN matmuls with fused epilogues on
the CPU (onednn_geglu.py); `conv2d_winograd` is a float32 or bf16 3x3 convolution by Winograd's
minimal filtering on the CPU (cpu_winograd.py), `conv2d` F.conv2d routed to it where it fits and
is faster (and to conv2d_packed for bf16 given a Packed holder). On AVX-512 CPUs `geglu` and
`group_norm_silu` have C++ kernels too (cpu_geglu.cpp, cpu_group_norm_silu.cpp), taken by 'auto'.
"""
from ._backend import cpuinfo, trace_constant
from .adaln import adaln_modulate, gated_residual
from .bias_act import bias_act
from .cpu_attention import attention_cpu
from .cpu_flash_bf16 import attention_cpu_bf16
from .cpu_flash_f32 import attention_cpu_f32
from .cpu_winograd import conv2d, conv2d_winograd
from .flash_attention import attention_math, attention_sdpa, attention_triton
from .geglu import geglu
from .group_norm_silu import group_norm_silu
from .minibatch_std import minibatch_std
from .onednn_conv import Packed, conv2d_packed
from .onednn_geglu import linear_geglu
from .onednn_linear import linear
from .sampler_update import guided_update
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ = ["adaln_modulate", "attention_cpu", "attention_cpu_bf16", "attention_cpu_f32", "attention_math",
           "attention_sdpa", "attention_triton", "bias_act", "conv2d", "conv2d_packed", "conv2d_winograd", "cpuinfo",
           "downsample2d", "filter2d", "gated_residual", "geglu", "group_norm_silu", "guided_update", "linear",
           "linear_geglu", "minibatch_std", "Packed", "setup_filter", "trace_constant", "upfirdn2d", "upsample2d"]
