"""`limner bench`: run the benchmark suite and render its JSON as a markdown table."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from .errors import LimnerError

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmarks(select: str | None, out_dir: Path, quick: bool) -> Path:
    """Run benchmarks/ under pytest-benchmark; returns the JSON it wrote."""
    import pytest
    import torch

    if not BENCH_DIR.is_dir():
        raise LimnerError(f"benchmarks not found at {BENCH_DIR}: run `limner bench` from a limner checkout")
    device = torch.cuda.get_device_name().replace(" ", "-").lower() if torch.cuda.is_available() else "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{device}.json"
    args = [str(BENCH_DIR), "-q", "-p", "no:cacheprovider", "--benchmark-enable",
            f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds"]
    if quick:
        args += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
    if select:
        args += ["-k", select]
    code = pytest.main(args)
    if code != 0:
        raise LimnerError(f"benchmarks failed (pytest exit code {int(code)})")
    _drop_raw_timings(json_path)
    return json_path


def _drop_raw_timings(json_path: Path) -> None:
    """Keep the statistics, not every round's timing: results are committed to the repo."""
    data = json.loads(json_path.read_text())
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    json_path.write_text(json.dumps(data, indent=1))


def _median(bench: dict) -> float:
    return bench["stats"]["median"]


def render(data: dict) -> str:
    """Markdown tables of one benchmark JSON: sampler overhead against a network forward."""
    benches = data["benchmarks"]
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
             f"python {machine.get('python_version', '?')}; {data.get('datetime', '')}", ""]
    network = [b for b in benches if b.get("extra_info", {}).get("group") == "network"]
    samplers = [b for b in benches if b.get("extra_info", {}).get("group") == "sampler"]
    if network and samplers:
        fwd = _median(network[0])
        info = network[0]["extra_info"]
        lines += [f"Denoiser forward ({info.get('model', 'network')}, {info['params'] / 1e6:.2f}M parameters, batch "
                  f"{'x'.join(map(str, info['shape']))}, {info['device']}): {fwd * 1e3:.3f} ms (median)", "",
                  "| sampler | NFE/step | sampler time per step (us) | overhead per NFE (% of a forward) |",
                  "|---|---:|---:|---:|"]
        for b in sorted(samplers, key=_median):
            ex = b["extra_info"]
            per_step = _median(b) / ex["steps"]
            per_nfe = per_step / max(ex["nfe_per_step"], 1e-9)
            lines.append(f"| {b['param']} | {ex['nfe_per_step']:.2f} | {per_step * 1e6:.1f} | "
                         f"{100 * per_nfe / fwd:.2f} |")
        lines.append("")
    others = [b for b in benches if b not in network and b not in samplers]
    if others:
        lines += ["| benchmark | median (ms) |", "|---|---:|"]
        lines += [f"| {b['name']} | {_median(b) * 1e3:.3f} |" for b in others]
    return "\n".join(lines) + "\n"


def render_file(json_path: Path) -> Path:
    """Write the markdown table next to the JSON; returns its path."""
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LimnerError(f"cannot read benchmark results {json_path}: {exc}") from None
    md = Path(json_path).with_suffix(".md")
    md.write_text(render(data))
    return md
