"""F.conv2d against limner.kernels.conv2d_packed (the weight packed for oneDNN once) at the
convolution shapes of Stable Diffusion 1.5's UNet at a 64x64 latent (batch 2, bfloat16,
channels-last, no grad), each side called in turn; the count is how many such convolutions one
UNet forward runs, so the last line is the forward's convolution time on each side.

    python benchmarks/packed_conv.py     # prints the markdown table (cpu-kernel-measurements.md)
"""
from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F
from in_turn import in_turn, medians

from limner.bench import cpu_name
from limner.kernels import Packed, conv2d_packed

# (in channels, out channels, latent pixels per side, kernel, how many per UNet forward)
SHAPES = [(320, 320, 64, 3, 8), (640, 640, 32, 3, 7), (1280, 1280, 16, 3, 8), (1280, 1280, 8, 3, 11),
          (2560, 1280, 16, 3, 2), (2560, 1280, 8, 3, 3), (1920, 1280, 16, 3, 1), (1920, 640, 32, 3, 1),
          (960, 320, 64, 3, 1), (640, 320, 64, 3, 2), (1280, 640, 32, 3, 1), (1280, 1280, 32, 3, 1),
          (640, 640, 64, 3, 1), (320, 640, 32, 3, 1), (640, 1280, 16, 3, 1), (320, 320, 64, 1, 10),
          (640, 640, 32, 1, 10), (1280, 1280, 16, 1, 10)]


def main(runs: int = 7) -> None:
    torch.manual_seed(0)
    lines = [f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/packed_conv.py`; medians of {runs} calls a side, "
             "alternated:", "",
             "| in -> out, pixels, kernel | per forward | F.conv2d ms | packed ms | speed-up |",
             "|---|---:|---:|---:|---:|"]
    total = {"plain": 0.0, "packed": 0.0}
    with torch.no_grad():
        for cin, cout, size, k, count in SHAPES:
            x = torch.randn(2, cin, size, size, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(cout, cin, k, k) * 0.01).to(torch.bfloat16)
            b = torch.randn(cout, dtype=torch.bfloat16)
            packed = Packed()
            sides = {"plain": partial(F.conv2d, x, w, b, 1, k // 2),
                     "packed": partial(conv2d_packed, x, w, b, 1, k // 2, 1, 1, packed)}
            med = {name: seconds * 1e3 for name, seconds in medians(in_turn(sides, runs)).items()}
            for name in total:
                total[name] += med[name] * count
            lines.append(f"| {cin} -> {cout}, {size}x{size}, {k}x{k} | {count} | {med['plain']:.1f} | "
                         f"{med['packed']:.1f} | {med['plain'] / med['packed']:.2f}x |")
    lines.append(f"| **one UNet forward's convolutions** | | {total['plain']:.0f} | {total['packed']:.0f} | "
                 f"**{total['plain'] / total['packed']:.2f}x** |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
