"""The eager GEGLU (gelu, product, their backwards and the halves' concatenation: six passes)
against limner's C++ one (kernels/cpu_geglu.cpp: one pass each way) in training, float32 forward +
backward, at the demo UNet's shapes (configs/shapes-unet.toml, batch 16) and one Stable Diffusion
1.5-size row (a 64x64 latent's 4,096 tokens, inner width 1,280); then the demo UNet's whole
training step (benchmarks/anchors.py's, as `limner train` runs it) with the kernel and without,
each side called in turn.

    python benchmarks/geglu_cpu.py   # prints the markdown (cpu-kernel-measurements.md)
"""
from __future__ import annotations

import importlib
import time
from functools import partial

import torch
from in_turn import in_turn, medians

from limner.bench import cpu_name

module = importlib.import_module("limner.kernels.geglu")  # the package's `geglu` is the function

# (x's shape [.., 2 x inner], how many per training step)
SHAPES = [((16, 256, 512), 3), ((16, 64, 512), 4), ((1, 4096, 2560), 1)]


def forward_backward(fn, x: torch.Tensor, grad: torch.Tensor) -> None:
    torch.autograd.grad(fn(x), x, grad)


def main(runs: int = 15) -> None:
    torch.manual_seed(0)
    if module.CPU_KERNEL.module() is None:
        raise SystemExit(f"limner's CPU GEGLU kernel is not available here: {module.CPU_KERNEL.failure}")
    lines = [f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/geglu_cpu.py`; float32, forward + backward, "
             f"medians of {runs} calls a side, alternated:", "",
             "| x (.., 2 x inner) | per demo step | eager ms | limner ms | speed-up |", "|---|---:|---:|---:|---:|"]
    total = {"eager": 0.0, "limner": 0.0}
    for shape, count in SHAPES:
        x = torch.randn(shape).requires_grad_()
        grad = torch.randn(*shape[:-1], shape[-1] // 2)
        sides = {"eager": partial(forward_backward, module.geglu_reference, x, grad),
                 "limner": partial(forward_backward, module.GEGLUCPU.apply, x, grad)}
        med = {name: seconds * 1e3 for name, seconds in medians(in_turn(sides, runs)).items()}
        if shape[0] == 16:
            for name in total:
                total[name] += med[name] * count
        lines.append(f"| {'x'.join(map(str, shape))} | {count if shape[0] == 16 else '-'} | {med['eager']:.2f} | "
                     f"{med['limner']:.2f} | {med['eager'] / med['limner']:.2f}x |")
    lines.append(f"| **demo UNet training step: its GEGLUs** | | {total['eager']:.1f} | {total['limner']:.1f} | "
                 f"**{total['eager'] / total['limner']:.2f}x** |")
    print("\n".join(lines))
    from anchors import train_step_with_and_without

    med = train_step_with_and_without(module, "cpu_kernel_fits", lambda x: False, runs)  # off: the eager reference
    print(f"\nThe demo UNet's training step (batch 16, forward + backward + fused AdamW, channels-last), medians of "
          f"{runs} alternated: with the GEGLU kernel {med['on'] * 1e3:.1f} ms, without {med['off'] * 1e3:.1f} ms: "
          f"**{med['off'] / med['on']:.2f}x**.")


if __name__ == "__main__":
    main()
