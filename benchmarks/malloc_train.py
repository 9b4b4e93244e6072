"""The demo's training step with glibc's malloc as it comes and with freed blocks kept
(limner.pipeline.freed_memory_kept, which `limner train` enters around its loop on the CPU), for
limner's step and diffusers' (benchmarks/anchors.py's steps, batch 16): page faults and seconds a
step. The block lasts for many steps, as in a run (leaving it hands the free heap back), so the
sides cannot alternate step by step: they alternate phase by phase instead, each phase one untimed
step and `--steps` timed ones, the malloc modes in turn within each tool.

    python benchmarks/malloc_train.py [--phases N] [--steps N]

writes benchmarks/results/malloc-train-<cpu>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from anchors import Sides

from limner.bench import cpu_name, cpu_slug
from limner.pipeline import freed_memory_kept

RESULTS = Path(__file__).parent / "results"
MODES = {"glibc's default": contextlib.nullcontext, "freed blocks kept": freed_memory_kept}


def phase(step, mode, steps: int) -> tuple[list[float], float]:
    """Seconds of each timed step and minor page faults a step, inside `mode`."""
    with MODES[mode]():
        step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps


def render(data: dict) -> str:
    lines = ["# A training step with glibc's malloc as it comes and with freed blocks kept\n",
             f"{data['cpu']}, {data['threads']} threads, torch {data['torch']}, {data['date']}; `python "
             f"benchmarks/malloc_train.py --phases {data['phases']} --steps {data['steps']}`. The demo UNet's "
             "training step, batch 16 (benchmarks/anchors.py: limner's as `limner train` runs it, diffusers' as "
             "train_text_to_image.py does), in phases of one untimed and "
             f"{data['steps']} timed steps, the two malloc modes in turn within each tool; medians of the steps, "
             "minor page faults a step the median of the phases'. \"freed blocks kept\": "
             "limner.pipeline.freed_memory_kept, entered once around `limner train`'s loop on the CPU.\n",
             "| tool | malloc | ms a step | [min, max] ms | page faults a step | speed-up |",
             "|---|---|---:|---|---:|---:|"]
    for tool, modes in data["rows"].items():
        base = modes["glibc's default"]["ms"]
        for mode, row in modes.items():
            lines.append(f"| {tool} | {mode} | {row['ms']:.1f} | [{row['min_ms']:.1f}, {row['max_ms']:.1f}] | "
                         f"{row['faults']:.0f} | **{base / row['ms']:.3f}x** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=10, help="phases a mode")
    parser.add_argument("--steps", type=int, default=5, help="timed steps a phase")
    args = parser.parse_args()
    s = Sides(torch.device("cpu"))
    data = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "phases": args.phases, "steps": args.steps, "rows": {}}
    for tool, make in (("limner", lambda: s.limner_train_step(copy.deepcopy(s.ours), channels_last=True)),
                       ("diffusers", s.diffusers_train_step)):
        steps = {mode: make() for mode in MODES}  # one model and optimiser a mode
        for step in steps.values():
            step()
        times, faults = {mode: [] for mode in MODES}, {mode: [] for mode in MODES}
        for _ in range(args.phases):
            for mode, step in steps.items():
                t, f = phase(step, mode, args.steps)
                times[mode] += t
                faults[mode].append(f)
        data["rows"][tool] = {mode: {"ms": statistics.median(times[mode]) * 1e3, "min_ms": min(times[mode]) * 1e3,
                                     "max_ms": max(times[mode]) * 1e3, "faults": statistics.median(faults[mode])}
                              for mode in MODES}
        print(render(data), flush=True)
    out = RESULTS / f"malloc-train-{cpu_slug()}"
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(f"Wrote {out}.md and .json")


if __name__ == "__main__":
    main()
