"""Kept float32 Winograd transforms (kernels/cpu_winograd.py, KEEP_BYTES): the demo UNet's guided
forward and its 20-step guided sampling (benchmarks/anchors.py's workloads, channels-last, the
shipped demo checkpoint), each small convolution's transformed weight kept between calls against
made at every call (KEEP_BYTES = 0), the two ways alternated round by round; the outputs compared.

    python benchmarks/winograd_keep.py   # prints the paragraph for cpu-kernel-measurements.md
"""
from __future__ import annotations

import statistics
import time

import torch
from anchors import Sides

from limner.bench import cpu_name
from limner.kernels import cpu_winograd
from limner.nn import KernelConv2d


def main(rounds: int = 12) -> None:
    torch.manual_seed(0)
    keep = cpu_winograd.KEEP_BYTES
    s = Sides(torch.device("cpu"))
    forward, sampling = s.limner_forward(s.ours, channels_last=True), s.limner_sampling(s.ours, channels_last=True)
    found = {}
    for name, fn, reps in (("guided forward", forward, 10), ("20-step guided sampling", sampling, 1)):
        ratios, kept_ms = [], []
        for r in range(rounds):
            seconds = {}
            for way in ((0, keep) if r % 2 == 0 else (keep, 0)):
                cpu_winograd.KEEP_BYTES = way
                fn()  # a kept transform made (or dropped) outside the timing
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                seconds[way] = (time.perf_counter() - start) / reps
            ratios.append(seconds[0] / seconds[keep])
            kept_ms.append(1e3 * seconds[keep])
        found[name] = (statistics.median(ratios), statistics.quantiles(ratios, n=4), statistics.median(kept_ms))
    cpu_winograd.KEEP_BYTES = 0
    made = forward()
    cpu_winograd.KEEP_BYTES = keep
    kept = forward()
    convs = [m for m in s.ours.modules() if isinstance(m, KernelConv2d) and m.packed.key is not None]
    size = sum(m.packed.weight.numel() * m.packed.weight.element_size() for m in convs) / 2 ** 20
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"`python benchmarks/winograd_keep.py`; {rounds} rounds, the two ways alternated: the demo UNet's "
          + "; ".join(f"{name} {ms:.1f} ms with the transforms kept, made at every call {ratio:.2f}x as long "
                      f"(quartiles {q[0]:.2f}-{q[2]:.2f})" for name, (ratio, q, ms) in found.items())
          + f". {len(convs)} convolutions keep theirs, {size:.1f} MB in all; the outputs are "
          + ("bit-equal." if torch.equal(made, kept) else f"apart by {(made - kept).abs().max().item():.1e}."))


if __name__ == "__main__":
    main()
