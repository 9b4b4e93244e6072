"""The demo's training step with glibc's malloc as it comes, with freed blocks kept around the
loop (limner.pipeline.freed_memory_kept, which `limner sample` enters around its sampling on the
CPU), and after one such block was entered and left (as in any process after its first image), for
limner's step and diffusers' (benchmarks/anchors.py's steps, batch 16): page faults and seconds a
step. Each side runs in a process of its own (leaving a block sets glibc's thresholds for the rest
of the process), processes in turn, round by round: one untimed step and `--steps` timed ones each.

    python benchmarks/malloc_train.py [--rounds N] [--steps N]

writes benchmarks/results/malloc-train-<cpu>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ("glibc's default", "freed blocks kept", "after a block")


def child(tool: str, mode: str, steps: int) -> None:
    """One side's steps in this process; prints their seconds and the faults a step as JSON."""
    import torch
    from anchors import Sides

    from limner.pipeline import freed_memory_kept

    s = Sides(torch.device("cpu"))
    step = (s.limner_train_step(copy.deepcopy(s.ours), channels_last=True) if tool == "limner"
            else s.diffusers_train_step())
    if mode == MODES[2]:
        with freed_memory_kept():
            step()
    with freed_memory_kept() if mode == MODES[1] else contextlib.nullcontext():
        step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    print(json.dumps({"times": times, "faults": faults}))


def render(data: dict) -> str:
    lines = ["# A training step with glibc's malloc as it comes and with freed blocks kept\n",
             f"{data['cpu']}, {data['threads']} threads, torch {data['torch']}, {data['date']}; `python "
             f"benchmarks/malloc_train.py --rounds {data['rounds']} --steps {data['steps']}`. The demo UNet's "
             "training step, batch 16 (benchmarks/anchors.py: limner's as `limner train` runs it, diffusers' as "
             "train_text_to_image.py does), each side in a process of its own, processes in turn round by "
             f"round, each one untimed and {data['steps']} timed steps; medians of the steps, minor page faults "
             "a step the median of the processes'. \"freed blocks kept\": the steps inside "
             "limner.pipeline.freed_memory_kept; \"after a block\": one step inside it first, the timed ones after "
             "it.\n",
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
    parser.add_argument("--rounds", type=int, default=4, help="processes a side")
    parser.add_argument("--steps", type=int, default=10, help="timed steps a process")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps)
        return
    import torch

    from limner.bench import cpu_name, cpu_slug

    data = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "steps": args.steps, "rows": {}}
    sides = [(tool, mode) for tool in ("limner", "diffusers") for mode in MODES]
    times = {side: [] for side in sides}
    faults = {side: [] for side in sides}
    for _ in range(args.rounds):
        for tool, mode in sides:
            out = subprocess.run([sys.executable, __file__, "--child", tool, mode, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            times[tool, mode] += run["times"]
            faults[tool, mode].append(run["faults"])
    for tool, mode in sides:
        data["rows"].setdefault(tool, {})[mode] = {
            "ms": statistics.median(times[tool, mode]) * 1e3, "min_ms": min(times[tool, mode]) * 1e3,
            "max_ms": max(times[tool, mode]) * 1e3, "faults": statistics.median(faults[tool, mode])}
    print(render(data), flush=True)
    out = RESULTS / f"malloc-train-{cpu_slug()}"
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(f"Wrote {out}.md and .json")


if __name__ == "__main__":
    main()
