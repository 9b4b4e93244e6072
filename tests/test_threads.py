"""Work commands fit torch's thread count to the cores other processes leave free (limner.threads)."""
import subprocess
import sys

import pytest
import torch

import limner
from limner import threads


def test_the_count_is_the_free_cores_at_least_one_unless_pinned():
    assert threads.choose(2, 2, None) == (2, None)  # nothing else running
    assert threads.choose(2, 5, None) == (2, None)  # more free than torch uses: torch's count
    assert threads.choose(2, None, None) == (2, None)  # load unknown: torch's count
    n, why = threads.choose(2, 1, None)
    assert n == 1 and "1 of the 2 cores busy" in why and "LIMNER_THREADS" in why
    n, why = threads.choose(4, -3, None)
    assert n == 1 and "all of the 4 cores" in why and "1 thread " in why
    assert threads.choose(8, 3, None)[0] == 3
    assert threads.choose(2, 0, "all") == (2, None)  # pinned: the load is not read
    assert threads.choose(2, 0, " 3 ") == (3, None)  # the user's own count: nothing to say
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(limner.LimnerError, match="LIMNER_THREADS must be a whole number >= 1 or 'all'"):
            threads.choose(2, 2, bad)


def test_the_runnable_count_is_read_from_the_kernel(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("2.70 2.85 2.28 3/113 31447\n")  # 3 runnable, the reader one of them
    assert threads.busy_elsewhere(reads=3, gap=0, source=str(loadavg)) == 2
    loadavg.write_text("garbage\n")
    assert threads.busy_elsewhere(source=str(loadavg)) is None
    assert threads.busy_elsewhere(source=str(tmp_path / "absent")) is None
    if sys.platform == "linux":
        assert threads.busy_elsewhere(reads=1) >= 0


def test_a_work_command_under_load_says_so_and_uses_the_free_cores(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("LIMNER_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 64)  # every core taken
    monkeypatch.setattr(limner.errors, "_said", set())  # the notice not yet said in this process
    try:
        assert threads.fit_to_load() == 1 and torch.get_num_threads() == 1
        # a container on a large host: the host's runnable count against the host's CPUs
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: 40)
        monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
        monkeypatch.setattr(threads, "cores", lambda: 2)
        torch.set_num_threads(2)
        assert threads.fit_to_load() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # set by hand: left alone
        torch.set_num_threads(before)
        assert threads.fit_to_load() == before
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "other processes keep all of the" in err and "cores busy: running on 1 thread " in err


def test_a_bad_limner_threads_is_one_clear_error(tmp_path):
    env = {"LIMNER_THREADS": "lots", "PATH": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "limner.cli", "eval", str(tmp_path / "no-run")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "LIMNER_THREADS must be a whole number >= 1 or 'all', got 'lots'" in done.stderr
