"""How many CPU threads limner's work commands run on: the cores other processes leave free.

PyTorch starts one thread per core. Beside another busy process that is one thread too many:
each parallel region waits for its slowest thread, and a thread whose core is taken waits a
whole time slice (benchmarks/results/thread-policy*.md: a training step 0.59 s median on 2
threads beside a 2-thread job, one step 8.3 s, the neighbour slowed by a quarter; on 1 thread
0.63-0.69 s, none slower than 1 s). So `limner train`, `sample`, `eval`, `caption`, `demo` and
`serve` count the threads other processes are running as they start (the kernel's runnable
count, /proc/loadavg, a few reads, against the machine's CPUs) and use the cores left, at
least one, saying so. One reading at start-up: a job that starts later is not seen.

`LIMNER_THREADS` pins the count (a number, or `all` for every core whatever the load), and
`OMP_NUM_THREADS` set by hand is kept as it is. A run resumed on another thread count is the
same model but not always the same bits (sums split across threads round differently): pin
the count where bit-exact resume matters.
"""
from __future__ import annotations

import os
import statistics
import time

from .errors import LimnerError, notice


def busy_elsewhere(reads: int = 5, gap: float = 0.002, source: str = "/proc/loadavg") -> int | None:
    """Threads other processes are running now: the kernel's count of runnable tasks
    (/proc/loadavg's fourth field) less the one reading it, the median of `reads` reads;
    None where the count cannot be read (not Linux)."""
    counts = []
    for i in range(reads):
        try:
            with open(source) as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < reads:
            time.sleep(gap)
    return max(0, int(statistics.median(counts)))


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose(default: int, free_cores: int | None, pinned: str | None) -> tuple[int, str | None]:
    """(threads, why) from torch's `default` count, the cores no other process is using
    (`free_cores`, None: unknown) and LIMNER_THREADS (`pinned`); `why`, the note to show, is None
    when the count is torch's default or the user's own."""
    if pinned is not None:
        text = pinned.strip().lower()
        if text == "all":
            return default, None
        if not text.isdigit() or int(text) < 1:
            raise LimnerError(f"LIMNER_THREADS must be a whole number >= 1 or 'all', got {pinned!r}")
        return int(text), None
    if free_cores is None or free_cores >= default:
        return default, None
    threads = max(1, free_cores)
    return threads, (f"other processes keep {default - free_cores if free_cores > 0 else 'all'} of the "
                     f"{default} cores busy: running on {threads} thread{'s' * (threads > 1)} "
                     "(LIMNER_THREADS=all for every core, or a number)")


def fit_to_load() -> int:
    """Set torch's thread count for a work command as the module says; returns it."""
    import torch

    if "OMP_NUM_THREADS" in os.environ and "LIMNER_THREADS" not in os.environ:
        return torch.get_num_threads()  # the user's own setting
    default = torch.get_num_threads()
    pinned = os.environ.get("LIMNER_THREADS")
    busy = None if pinned is not None else busy_elsewhere()
    # the runnable count is the whole machine's (a container sees its host's): compared with the
    # machine's CPUs, so that a small container on a large busy host keeps its own cores
    free = None if busy is None else min(cores(), (os.cpu_count() or cores()) - busy)
    threads, why = choose(default, free, pinned)
    if threads != default:
        torch.set_num_threads(threads)
    if why:
        notice(why, key="threads")
    return threads
