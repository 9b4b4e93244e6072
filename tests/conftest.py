"""Shared test set-up: offline, Triton in its interpreter, a fresh registry per test."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LIMNER_THREADS", "all")  # commands keep every core whatever else runs (limner.threads)

import importlib.metadata  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` from the repository root puts the root on sys.path, where the top-level
# kernels/ folder would shadow Hugging Face's `kernels` package (transformers and diffusers import
# it): the root never stays on the path (limner itself is installed, editable)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import limner.registry as registry_mod  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_registry():
    """Every test starts from the entry points as installed, and leaves no registry behind."""
    registry_mod.set_registry(None)
    yield
    registry_mod.set_registry(None)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Make a distribution visible to importlib.metadata: fake_dist(name, module_source, ep_name)."""

    def make(dist: str, source: str, module: str | None = None, version: str = "1.0") -> Path:
        module = module or dist.replace("-", "_")
        site = tmp_path / f"site-{dist}"
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[limner]\n{dist} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.delitem(sys.modules, module, raising=False)
        return site

    yield make
    importlib.invalidate_caches()


@pytest.fixture
def train_two_ranks():
    """train_two_ranks(config, cwd, port): `limner train` as 2 gloo processes; the run's ranks.json and their stdout."""
    return _train_two_ranks


def _train_two_ranks(config: Path, cwd: Path, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "limner.cli", "train", str(config)],
        env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads((config.with_suffix("") / "ranks.json").read_text()), "stdout": result.stdout}
