"""The attention dispatcher: one call site for every model, many registered backends.

`backend=None` takes LIMNER_ATTENTION if set, else `auto`. A backend declares what it is good
for (`Declared`: the inputs it `fits`, and a `rank` for the untimed choice); the dispatcher
names none of them. On CUDA `auto` is the fastest backend for this (GPU, dtype, shape) by a
preference table that is measured, not assumed: the first call at a new shape times every
backend that builds here (CUDA events, median of a few runs) and remembers the winner, in
memory and in ~/.cache/limner/attention-<gpu>.json (LIMNER_CACHE_DIR moves it), so later
processes skip the measurement (on 2026-11-22 xformers measured ~1.5x slower than sdpa at
diffusion shapes on an H100: a fixed preference would have been wrong there). On the CPU, and
inside a trace where nothing can be timed, `auto` is a fixed rule, so CPU runs stay
deterministic: the highest-ranked backend that fits the inputs (limner's own: the C++ kernel
where it takes them and is built, else torch's sdpa; benchmarks/results/cpu-kernel-measurements.md).
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from limner.kernels import trace_constant

from .errors import LimnerError
from .files import cache_dir, write_text_atomic
from .registry import create, list_components, registry

_built: dict[str, tuple[object, Callable]] = {}  # name -> (the registry it came from, backend)


class Declared:
    """An attention backend that says what it is for: `fits(q, k, v, mask)` is False for inputs
    it cannot take (default: it takes all), and `rank` orders the untimed choice (the CPU's
    `auto`, and inside a trace): the highest-ranked backend that fits wins; None (default)
    leaves it to measurement on CUDA and to being named."""

    def __init__(self, fn: Callable, *, fits: Callable[..., bool] | None = None, rank: int | None = None):
        self.fn, self.fits, self.rank = fn, fits or (lambda q, k, v, mask: True), rank
        self.__doc__ = fn.__doc__

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(q, k, v, mask)


def _backend(name: str) -> Callable:
    if torch.compiler.is_compiling():  # a trace must not step into plugin loading: built untraced, once
        _untraced(name)
        return _built[name][1]
    return _build(name)


@trace_constant
def _untraced(name: str = "") -> bool:
    """Builds the backend `name` (every backend where none is named) for a torch.compile trace: dynamo
    runs this as it traces and keeps its constant result, so plugin loading is no graph break
    (torch.compiler.disable would split the graph, and a break in a UNet's loop over its blocks
    throws the whole forward back to eager)."""
    _build(name) if name else _refresh()
    return True


def _build(name: str) -> Callable:
    current = registry()
    if name not in _built or _built[name][0] is not current:  # a new registry (plugins changed) rebuilds
        _built[name] = (current, create("attention_backends", name))
    return _built[name][1]



def shape_key(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> str:
    """What the preference depends on: dtype, batch x heads, lengths, head dim, mask, grad."""
    b, h, lq, dh = q.shape
    grad = torch.is_grad_enabled() and q.requires_grad
    return (
        f"{str(q.dtype).removeprefix('torch.')}|{b * h}|{lq}|{k.shape[2]}|{dh}|{'mask' if mask is not None else '-'}|"
        f"{'grad' if grad else 'nograd'}"
    )


def cuda_timer(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of fn on the current CUDA stream, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class PreferenceTable:
    """Measured best backend per shape key, persisted as JSON {key: {backend: seconds}}."""

    def __init__(self, path: Path | None, timer: Callable[[Callable[[], object]], float] = cuda_timer):
        self.path, self.timer = path, timer
        self.timings: dict[str, dict[str, float]] = self._load()

    def _load(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # a broken cache is re-measured, never fatal

    def best(self, key: str) -> str | None:
        timings = self.timings.get(key)
        return min(timings, key=timings.get) if timings else None

    def measure(self, key: str, candidates: dict[str, Callable[[], object]]) -> str:
        """Time every candidate that runs (one that raises is skipped) and record the result."""
        timings = {}
        for name, run in candidates.items():
            try:
                timings[name] = self.timer(run)
            except Exception:  # noqa: BLE001 - a backend that cannot take this input is not a candidate
                continue
        if not timings:
            raise LimnerError(f"no attention backend could run inputs {key}")
        self.timings[key] = timings
        self._save()
        return min(timings, key=timings.get)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            write_text_atomic(self.path, json.dumps(self.timings, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only home only costs a re-measurement next process


_tables: dict[str, PreferenceTable] = {}  # GPU model -> its table
_gpu_names: dict[int, str] = {}  # device index -> GPU model, asked of the driver once, not every attention call


def preference_table(device: torch.device) -> PreferenceTable:
    """The table of this GPU model, loaded once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpu_names:
        _gpu_names[index] = torch.cuda.get_device_name(index).replace(" ", "-").lower()
    name = _gpu_names[index]
    if name not in _tables:
        _tables[name] = PreferenceTable(cache_dir() / f"attention-{name}.json")
    return _tables[name]


# (the registry, the backends that build here, the ranked ones highest first), built once per registry
_buildable: tuple[object, list[tuple[str, Callable]], list[tuple[str, Declared]]] | None = None


def _refresh() -> tuple[object, list[tuple[str, Callable]], list[tuple[str, Declared]]]:
    global _buildable
    current = registry()
    if _buildable is None or _buildable[0] is not current:
        found = []
        for name in sorted(list_components("attention_backends")["attention_backends"]):
            try:
                found.append((name, _build(name)))
            except LimnerError:  # a factory that refuses here (xformers not installed) is no candidate
                continue
        ranked = [(name, fn) for name, fn in found if isinstance(fn, Declared) and fn.rank is not None]
        _buildable = (current, found, sorted(ranked, key=lambda item: -item[1].rank))
    return _buildable


def buildable_backends() -> list[tuple[str, Callable]]:
    """Every registered backend (a plugin's too) that builds here, by name."""
    return _refresh()[1]


def untimed_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The fixed rule: the highest-ranked declared backend whose `fits` takes these inputs."""
    if torch.compiler.is_compiling():  # plugin loading stays out of the trace
        _untraced()
        ranked = _buildable[2]
    else:
        ranked = _refresh()[2]
    for name, fn in ranked:
        if fn.fits(q, k, v, mask):
            return name
    raise LimnerError(f"no attention backend declares that it takes {shape_key(q, k, mask)} on "
                      f"{q.device.type}; name one with LIMNER_ATTENTION (see `limner plugins`)")


def preferred_backend(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, table: PreferenceTable | None = None) -> str:
    """The backend `auto` uses for these inputs: measured on CUDA, the fixed rule on the CPU."""
    k, v = (q if t is None else t for t in (k, v))
    if not q.is_cuda and table is None:
        return untimed_choice(q, k, v, mask)
    table = table or preference_table(q.device)
    key = shape_key(q, k, mask)
    best = table.best(key)
    if best is not None:
        return best
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return untimed_choice(q, k, v, mask)  # no timing inside a trace or a CUDA graph capture
    grad = key.endswith("|grad")
    runs = {name: _timed_call(fn, q, k, v, mask, grad) for name, fn in buildable_backends()}
    return table.measure(key, runs)


def _timed_call(fn: Callable, q, k, v, mask, grad: bool) -> Callable[[], object]:
    """What one measurement runs: the forward, or forward + backward where training will."""
    if not grad:
        return lambda: _no_grad_call(fn, q, k, v, mask)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward_backward():
        with torch.enable_grad():
            out = fn(*leaves, mask)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return forward_backward


def _no_grad_call(fn: Callable, q, k, v, mask):
    with torch.no_grad():
        return fn(q, k, v, mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, H, L, Dh]; mask True = attend."""
    name = backend or os.environ.get("LIMNER_ATTENTION") or "auto"
    if name == "auto":
        name = preferred_backend(q, k, v, mask)
    return _backend(name)(q, k, v, mask)
