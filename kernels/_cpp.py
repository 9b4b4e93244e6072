"""Building limner's C++ CPU kernels (kernels/*.cpp) once and importing them afterwards.

A kernel is compiled with torch.utils.cpp_extension the first time a process needs it (about
20 s; needs a C++ compiler) into LIMNER_CACHE_DIR or ~/.cache/limner/cpp/<name>_<hash> (the hash
covers the source, the flags, torch's and python's versions); a later process imports the built
module directly (~1 ms, without importing cpp_extension). Where it cannot be built (no AVX-512,
no compiler, a failed build) `module()` is None, and limner says so once, with the reason.

Inside a torch.compile trace a kernel's function is a torch.library custom op (`define`): opaque to
dynamo, which cannot step into a compiled extension, and to inductor, which fuses the work around
it; its fake function gives the output's shape and strides without running it. Eager calls go to
the module directly: the op's dispatch costs ~13 us a call, ~1% of the demo UNet's forward.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ._backend import trace_constant

FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp"]


def supported_cpu() -> bool:
    """x86-64 with AVX-512, as torch's own CPU kernels see it."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "AVX512"


class CppKernel:
    """One kernels/<file>.cpp exposing `functions`, built or imported on first use."""

    def __init__(self, source: str, functions: list[str], fallback: str, flags: tuple[str, ...] = ()):
        self.source, self.functions, self.fallback = Path(__file__).with_name(source), functions, fallback
        self.flags = [*FLAGS, *flags]  # a kernel's own on top of the shared ones (e.g. -mavx512bf16)
        self._module, self.failure = None, None
        self._specs: dict[str, tuple[str, Callable]] = {}
        self._ops: dict[str, Callable] = {}

    def define(self, name: str, schema: str, fake: Callable) -> None:
        """Declares the module's `name` a custom op, limner::<file>_<name>, with `schema` its signature
        ("(Tensor x, int m) -> Tensor") and `fake` its output's shape and strides: registered with
        torch once the module is built (`module()`), so that importing limner registers nothing (~1 ms
        an op) and a kernel that cannot build here has no op."""
        self._specs[name] = (schema, fake)

    def _register(self) -> None:
        for name, (schema, fake) in self._specs.items():
            def run(*args, name=name, **kwargs):
                return getattr(self._module, name)(*args, **kwargs)
            op = torch.library.custom_op(f"limner::{self.source.stem}_{name}", run, mutates_args=(), schema=schema)
            op.register_fake(fake)
            self._ops[name] = op

    def function(self, name: str) -> Callable:
        """The module's `name`: its custom op inside a torch.compile trace (`define`; a trace asks
        `available()` first, which builds the module and registers its ops), else the module's own
        function."""
        if torch.compiler.is_compiling():
            return self._ops[name]
        return getattr(self.module(), name)

    @trace_constant
    def available(self) -> bool:
        """Whether the module builds here (`module()` is not None); a constant to a torch.compile
        trace, which runs it untraced."""
        return self.module() is not None

    def build(self):
        text = self.source.with_name("cpu_math.h").read_text() + self.source.read_text()  # shared vector math first
        tag = hashlib.sha256((text + " ".join(self.flags) + torch.__version__ + sys.version).encode()).hexdigest()[:12]
        name = f"limner_{self.source.stem}_{tag}"
        folder = Path(os.environ.get("LIMNER_CACHE_DIR") or Path.home() / ".cache" / "limner") / "cpp" / name
        built = folder / f"{name}.so"
        if built.is_file():
            try:
                spec = importlib.util.spec_from_file_location(name, built)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
            except ImportError:  # half-written by a process building it now: load_inline waits for that build
                pass
        from torch.utils.cpp_extension import load_inline

        folder.mkdir(parents=True, exist_ok=True)
        return load_inline(name, cpp_sources=[text], functions=self.functions, extra_cflags=self.flags,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder))

    def module(self):
        """The built module, or None where it cannot be built here (said once, with why)."""
        if self._module is None and self.failure is None:
            if not supported_cpu():
                self.failure = "this CPU has no AVX-512"
            else:
                try:
                    self._module = self.build()
                except Exception as exc:  # noqa: BLE001 - no compiler, a failed build: the fallback still works
                    text = str(exc).strip()
                    self.failure = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
                if self._module is not None:
                    self._register()
            if self.failure:
                warnings.warn(f"limner's {self.source.name} kernel could not be built ({self.failure}); "
                              f"{self.fallback}", RuntimeWarning, stacklevel=3)
        return self._module
