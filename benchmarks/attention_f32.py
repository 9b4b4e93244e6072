"""limner's float32 CPU attention (limner.kernels.attention_cpu_f32) against torch's flash kernel
(F.scaled_dot_product_attention) at Stable Diffusion's shapes, self-attention (the shapes of
attention_bf16.py) and cross-attention to 77 text tokens, each side called in turn (no grad,
batch 2, q, k, v strided views of [B, L, H, D] as the models make them). The rule in
kernels/cpu_flash_f32.py (`faster`) and the table in benchmarks/results/cpu-kernel-measurements.md
come from this; the last column says whether `auto` takes limner's kernel there.

    python benchmarks/attention_f32.py     # prints the markdown table
"""
from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F
from attention_bf16 import ATTENTION
from in_turn import in_turn, medians

from limner.bench import cpu_name
from limner.kernels import attention_cpu_f32
from limner.kernels.cpu_flash_f32 import faster

CROSS = [("SD 1.5 64x64, to 77 tokens", 8, 4096, 40, 5), ("SD 1.5 32x32, to 77 tokens", 8, 1024, 80, 5),
         ("SD 1.5 16x16, to 77 tokens", 8, 256, 160, 5), ("SDXL 64x64, to 77 tokens", 10, 4096, 64, 4),
         ("SDXL 32x32, to 77 tokens", 20, 1024, 64, 20)]


def main(runs: int = 7) -> None:
    torch.manual_seed(0)
    lines = [f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/attention_f32.py`; float32, medians of {runs} calls a "
             "side, alternated, batch 2, no grad.", "",
             "| attention | heads x queries x keys x head dim | per forward | torch ms | limner ms | speed-up | auto |",
             "|---|---|---:|---:|---:|---:|---|"]
    with torch.no_grad():
        for what, heads, queries, d, count, keys in ([(*row, row[2]) for row in ATTENTION] +
                                                      [(*row, 77) for row in CROSS]):
            b = 1 if what.startswith("VAE") else 2
            q = torch.randn(b, queries, heads, d).transpose(1, 2)
            k, v = torch.randn(b, keys, 2, heads, d).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            sides = {"torch": partial(F.scaled_dot_product_attention, q, k, v),
                     "limner": partial(attention_cpu_f32, q, k, v)}
            med = {name: s * 1e3 for name, s in medians(in_turn(sides, runs)).items()}
            lines.append(f"| {what} | {heads} x {queries} x {keys} x {d} | {count or ''} | {med['torch']:.2f} | "
                         f"{med['limner']:.2f} | {med['torch'] / med['limner']:.2f}x | "
                         f"{'limner' if faster(q, k) else 'torch'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
