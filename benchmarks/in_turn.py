"""Sides timed in turn, as the side-by-side benchmarks here measure (bf16_cpu.py, sd15_speed.py,
packed_conv.py): one warm-up call each, then run after run every side once, in the same order,
so a machine that slows down or speeds up meanwhile touches every side alike."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def in_turn(sides: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds of each call of each side."""
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in times.items()}


def spread(times: dict[str, list[float]], digits: int) -> dict[str, list[float]]:
    """[min, max] seconds of each side."""
    return {name: [round(min(v), digits), round(max(v), digits)] for name, v in times.items()}
