"""Where a training step's time goes: torch.profiler over limner's and diffusers' step of
benchmarks/anchors.py (same model configuration, batch 16), top ops by self CPU time.

    T=2 python benchmarks/profile_train.py > benchmarks/results/cpu-train-profile.md
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402 (after the path set-up above)

torch.set_num_threads(int(os.environ.get("T", "2")))
from anchors import Sides  # noqa: E402

s = Sides(torch.device("cpu"))
ours = s.limner_train_step(s.ours, channels_last=os.environ.get("CL", "1") == "1")
theirs = s.diffusers_train_step()
for f in (ours, theirs):
    for _ in range(3):
        f()
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for name, f in (("limner", ours), ("diffusers", theirs)):
    t = time.perf_counter()
    for _ in range(5):
        f()
    print(f"\n## {name}: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms/step, {torch.get_num_threads()} threads\n\n```")
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5):
            f()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(os.environ.get("ROWS", "22"))))
    print("```")
