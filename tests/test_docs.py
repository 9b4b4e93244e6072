"""Every Python block in docs/ and the README runs as written."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def python_blocks():
    for path in DOCS:
        for k, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)):
            yield pytest.param(block, id=f"{path.name}-{k}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_python_block_runs(code, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the checkout
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc__"})
