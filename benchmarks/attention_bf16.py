"""limner's bf16 CPU kernels at Stable Diffusion's shapes against torch's, each side called in turn
(no grad, batch 2): attention (limner.kernels.attention_cpu_bf16 against torch's flash kernel,
F.scaled_dot_product_attention) and a GEGLU feed-forward's projection (limner.kernels.linear_geglu,
two oneDNN matmuls with fused epilogues, against F.linear + chunk + gelu + product), in bf16 and
float32 for the latter. The attention rule in kernels/cpu_flash_bf16.py (`faster`) and the tables
in benchmarks/results/cpu-kernel-measurements.md come from this.

    python benchmarks/attention_bf16.py     # prints the markdown tables
"""
from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F
from in_turn import in_turn, medians

from limner.bench import cpu_name
from limner.kernels import attention_cpu_bf16, linear_geglu

# (what, heads, pixels = keys, head dim, how many per UNet forward)
ATTENTION = [("SD 1.5 64x64", 8, 4096, 40, 5), ("SD 1.5 32x32", 8, 1024, 80, 5), ("SD 1.5 16x16", 8, 256, 160, 5),
             ("SD 1.5 8x8 (mid)", 8, 64, 160, 1), ("SDXL 64x64", 10, 4096, 64, 4),
             ("SDXL 32x32", 20, 1024, 64, 20), ("head dim 128, 64x64", 4, 4096, 128, 0),
             ("VAE mid block, 512 px", 1, 4096, 512, 0)]
# (rows, width; the projection goes to 2 x 4 x width)
GEGLU = [(8192, 320, 5), (2048, 640, 5), (512, 1280, 6)]


def main(runs: int = 9) -> None:
    torch.manual_seed(0)
    head = (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}; `python benchmarks/attention_bf16.py`; medians of {runs} calls a side, "
            "alternated, batch 2, no grad.")
    lines = [head, "",
             "| attention (self) | heads x pixels x head dim | per forward | torch ms | limner ms | speed-up |",
             "|---|---|---:|---:|---:|---:|"]
    with torch.no_grad():
        for what, heads, pixels, d, count in ATTENTION:
            b = 1 if what.startswith("VAE") else 2
            q, k, v = (torch.randn(b, pixels, heads, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
            sides = {"torch": partial(F.scaled_dot_product_attention, q, k, v),
                     "limner": partial(attention_cpu_bf16, q, k, v)}
            med = {name: s * 1e3 for name, s in medians(in_turn(sides, runs)).items()}
            lines.append(f"| {what} | {heads} x {pixels} x {d} | {count or ''} | {med['torch']:.1f} | "
                         f"{med['limner']:.1f} | {med['torch'] / med['limner']:.2f}x |")
        lines += ["", "| GEGLU projection | rows x (width -> 2 x 4 x width) | per forward | dtype | eager ms | "
                  "fused ms | speed-up |", "|---|---|---:|---|---:|---:|---:|"]
        for rows, width, count in GEGLU:
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(rows, width, dtype=dtype)
                w = (torch.randn(8 * width, width) / width ** 0.5).to(dtype)
                bias = torch.randn(8 * width, dtype=dtype)
                sides = {"eager": partial(linear_geglu, x, w, bias, backend="eager"),
                         "fused": partial(linear_geglu, x, w, bias, backend="onednn")}
                med = {name: s * 1e3 for name, s in medians(in_turn(sides, runs)).items()}
                lines.append(f"| SD 1.5, {rows} rows | {rows} x ({width} -> {8 * width}) | {count} | "
                             f"{str(dtype)[6:]} | {med['eager']:.1f} | {med['fused']:.1f} | "
                             f"{med['eager'] / med['fused']:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
