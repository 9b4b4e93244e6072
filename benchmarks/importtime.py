"""Where start-up time goes: `python -X importtime` of limner commands, self time summed by
top-level package, in fresh processes.

    python benchmarks/importtime.py --label after            # this checkout
    git checkout 40737ec -- framework plugins kernels          # an older one, then back:
    python benchmarks/importtime.py --label before && git checkout HEAD -- framework plugins kernels

Each run adds (or replaces) its label's rows in benchmarks/results/cpu-importtime.json and
re-renders the .md beside it.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu-importtime.json"
COMMANDS = {
    "limner sample (demo checkpoint, 20 steps)": [
        "sample",
        "checkpoints/shapes-unet",
        "-p",
        "a red circle at the top left",
        "--steps",
        "20",
        "--out",
        "/tmp/limner-importtime",
    ],
    "limner plugins": ["plugins"],
    "limner --help": ["--help"],
}
SHOWN = ("torch", "transformers", "scipy", "triton", "sympy", "limner")


def measure(args: list[str]) -> dict:
    """Import seconds by top-level package (self time) and the process's wall time."""
    code = f"import sys; sys.argv = {['limner', *args]!r}; from limner.cli import main; main(sys.argv[1:])"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"limner {' '.join(args)} failed: {proc.stderr[-500:]}")
    by_package: collections.Counter = collections.Counter()
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        if self_us.strip().isdigit():
            by_package[name.strip().split(".")[0]] += int(self_us)
    return {"wall_s": wall, "import_s": sum(by_package.values()) / 1e6,
            "packages_s": {k: v / 1e6 for k, v in by_package.items()}}


def render(data: dict) -> str:
    lines = ["`python -X importtime`, self time summed by top-level package, median of "
             f"{data['runs']} fresh processes per row ({data['machine']}; benchmarks/importtime.py)", "",
             f"| command | label | total import (s) | {' | '.join(SHOWN)} | wall (s) |",
             "|---|---|---:|" + "---:|" * len(SHOWN) + "---:|"]
    for row in data["rows"]:
        cells = [f"{row['packages_s'].get(p, 0):.2f}" if row["packages_s"].get(p, 0) >= 0.005 else "-" for p in SHOWN]
        lines.append(f"| {row['command']} | {row['label']} | {row['import_s']:.2f} | {' | '.join(cells)} | "
                     f"{row['wall_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="What this checkout is, e.g. before / after.")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    data["rows"] = [r for r in data["rows"] if r["label"] != args.label]
    for name, argv in COMMANDS.items():
        runs = [measure(argv) for _ in range(args.runs)]
        packages = {p: statistics.median(r["packages_s"].get(p, 0.0) for r in runs)
                    for p in set().union(*(r["packages_s"] for r in runs))}
        data["rows"].append({"command": name, "label": args.label, "runs": args.runs,
                             "wall_s": statistics.median(r["wall_s"] for r in runs),
                             "import_s": statistics.median(r["import_s"] for r in runs),
                             "packages_s": {k: v for k, v in packages.items() if v >= 0.001}})
    data.update(runs=args.runs, machine=f"python {sys.version.split()[0]}, {__import__('platform').machine()}")
    data["rows"].sort(key=lambda r: (r["command"], r["label"] != "before"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    RESULTS.with_suffix(".md").write_text(render(data))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
