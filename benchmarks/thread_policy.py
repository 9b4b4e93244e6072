"""How limner's CPU threads behave beside another busy process (issue 28): the demo UNet's
training step (benchmarks/anchors.py's, batch 16) alone and while a second 2-thread job (float32
matmuls in a loop) shares the cores, under OpenMP wait policies and thread counts.

PyTorch's CPU build uses GNU OpenMP (libgomp): a thread that finds no work spins for a while
before it sleeps (GOMP_SPINCOUNT, OMP_WAIT_POLICY). Alone, spinning saves a wake-up per parallel
region; beside another busy process, a spinning thread burns the time slice the other thread
of its own parallel region needs. Each cell runs in a fresh process (the policy is read when
libgomp loads); the second job's matmul rate is reported too, so a setting that only takes
time from its neighbour shows.

    python benchmarks/thread_policy.py [RESULTS.json]   # default benchmarks/results/thread-policy.{json,md}

The last cell of each half starts as limner's work commands do (limner.threads.fit_to_load:
the cores other processes leave free, at least one), the thread count it chose reported.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "thread-policy"
POLICIES = {"default (libgomp spins, then sleeps)": {},
            "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}
FITTED = "limner's work commands (threads fitted to the load: limner.threads)"
STEPS = 30

BUSY = """
import os, sys, time, torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
n, start = 0, time.perf_counter()
while True:
    a @ a
    n += 1
    if n % 20 == 0:
        print(n / (time.perf_counter() - start) * 2 * 1024**3 / 1e9, flush=True)
"""

STEP = """
import json, statistics, sys, time
sys.path.insert(0, {here!r})
import torch
if {threads} is None:  # as a work command starts
    from limner.threads import fit_to_load
    fit_to_load()
else:
    torch.set_num_threads({threads})
from anchors import Sides
s = Sides(torch.device("cpu"))
step = s.limner_train_step(s.ours, channels_last=True)
for _ in range(3):
    step()
times = []
for _ in range({steps}):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({{"times": times, "threads": torch.get_num_threads()}}))
"""


def cell(env: dict, threads: int | None, loaded: bool) -> dict:
    """Median seconds per training step in a fresh process (and the busy job's GFLOP/s meanwhile)."""
    busy = None
    if loaded:
        busy = subprocess.Popen([sys.executable, "-P", "-c", BUSY], stdout=subprocess.PIPE, text=True)
        busy.stdout.readline()  # running
    try:
        code = STEP.format(here=str(HERE), threads=threads, steps=STEPS)
        env = {**{k: v for k, v in os.environ.items() if k not in ("LIMNER_THREADS", "OMP_NUM_THREADS")}, **env}
        done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, env=env)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        times = out["times"]
    finally:
        rate = None
        if busy is not None:
            busy.terminate()
            lines = busy.stdout.read().split()
            rate = float(lines[-1]) if lines else None
    return {"threads": out["threads"], "step_s": round(statistics.median(times), 4),
            "spread": [round(min(times), 4), round(max(times), 4)],
            **({"busy_job_gflops": round(rate, 1)} if rate else {})}


def main() -> None:
    import torch

    from limner.bench import cpu_name

    results = RESULTS if len(sys.argv) < 2 else Path(sys.argv[1]).with_suffix("")
    data = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "steps": STEPS, "command": " ".join(["python benchmarks/thread_policy.py", *sys.argv[1:]]), "rows": []}
    cells = [(policy, env, threads) for policy, env in POLICIES.items() for threads in (2, 1)] + [(FITTED, {}, None)]
    for loaded in (False, True):
        for policy, env, threads in cells:
            print(f"{'loaded' if loaded else 'alone'} {policy} threads {threads} ...", flush=True)
            data["rows"].append({"loaded": loaded, "policy": policy, **cell(env, threads, loaded)})
            results.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    results.with_suffix(".md").write_text(render(data))
    print(render(data))


def render(data: dict) -> str:
    lines = ["# Threads beside another busy process (issue 28)", "",
             f"Machine: {data['cpu']}, {data['cores']} cores; torch {data['torch']}; {data['date']}. Command: "
             f"`{data.get('command', 'python benchmarks/thread_policy.py')}`. The demo UNet's training step "
             "(batch 16), median of "
             f"{data['steps']} steps in a fresh process per cell; 'beside a busy job': a second process multiplies "
             "1024x1024 float32 matrices on 2 threads meanwhile (its rate in the last column).", "",
             "| | policy | threads | step s | [min, max] | busy job GFLOP/s |", "|---|---|---:|---:|---|---:|"]
    for r in data["rows"]:
        lines.append(f"| {'beside a busy job' if r['loaded'] else 'alone'} | {r['policy']} | {r['threads']} | "
                     f"{r['step_s']} | {r['spread']} | {r.get('busy_job_gflops', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
