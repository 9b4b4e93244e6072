"""Benchmarks run with `limner bench` (or `pytest benchmarks --benchmark-enable`)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def sync(device):
    """Call after timed GPU work so the timer sees it finish."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
