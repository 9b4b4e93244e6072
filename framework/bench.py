"""`limner bench`: run the benchmark suite and render its JSON as a markdown table."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

from .errors import LimnerError
from .files import write_text_atomic


def cpu_name() -> str:
    """The CPU's model name, as every results file names its machine (/proc/cpuinfo, else platform),
    with an AMD core's generation where cpuinfo's family and model say it ("AMD EPYC (Zen 4)"): the
    virtual machines of this project's kind report a bare "AMD EPYC" on Zen 4 and on Zen 5 alike, and
    the two differ in speed (Zen 5 runs 512-bit vectors whole, Zen 4 in two halves)."""
    from limner.kernels import cpuinfo

    field = {}
    for line in cpuinfo().splitlines():
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    name = field.get("model name") or platform.processor()
    core = _amd_core(field) if field.get("vendor_id") == "AuthenticAMD" else None
    return f"{name} ({core})" if core and core not in name else name


def _amd_core(field: dict) -> str | None:
    """AMD's family/model numbering (family 19h: Zen 3, and Zen 4 at models 10-1Fh, 60-7Fh, A0-AFh;
    family 1Ah: Zen 5)."""
    try:
        family, model = int(field["cpu family"]), int(field["model"])
    except (KeyError, ValueError):
        return None
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if model >> 4 in (0x1, 0x6, 0x7, 0xA) else "Zen 3"
    return None


def cpu_slug() -> str:
    """cpu_name() as a file-name part: "Intel(R) Xeon(R) Processor" -> "intel-xeon"."""
    name = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b|\d+-core", " ", cpu_name().lower())
    return "-".join(re.findall(r"[a-z0-9]+", name)) or "unknown"


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
    _tidy(json_path)
    return json_path


def run_anchors(out_dir: Path, quick: bool) -> Path:
    """benchmarks/anchors.py: limner beside diffusers and k-diffusion; returns the JSON it wrote."""
    import importlib.util

    script = BENCH_DIR / "anchors.py"
    if not script.is_file():
        raise LimnerError(f"{script} not found: run `limner bench --anchors` from a limner checkout")
    missing = [m for m in ("diffusers",) if importlib.util.find_spec(m) is None]
    if missing:
        raise LimnerError(f"the side-by-side needs its anchors ({', '.join(missing)} not installed): "
                          "pip install -e '.[bench]' && pip install --no-deps k-diffusion")
    spec = importlib.util.spec_from_file_location("limner_bench_anchors", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(out_dir, quick)


def _tidy(json_path: Path) -> None:
    """Keep the statistics, not every round's timing (results are committed to the repo), and
    record the accelerator and library versions next to pytest-benchmark's machine info."""
    import torch

    data = json.loads(json_path.read_text())
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    versions = {"torch": torch.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    data["limner"] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **versions}
    write_text_atomic(json_path, json.dumps(data, indent=1))


def _median(bench: dict) -> float:
    return bench["stats"]["median"]


def render(data: dict) -> str:
    """Markdown tables of one benchmark JSON: sampler overhead against a network forward."""
    benches = data["benchmarks"]
    machine = data.get("machine_info", {})
    env = data.get("limner", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k != "device")
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}"
             f"{', ' + env['device'] if env.get('device', 'cpu') != 'cpu' else ''}, "
             f"python {machine.get('python_version', '?')}{', ' + versions if versions else ''}; "
             f"{data.get('datetime', '')}", ""]
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
    lines += _kernel_table(benches) + _attention_table(benches) + _end_to_end_table(benches)
    grouped = ("network", "sampler", "kernel", "copy", "attention", "e2e")
    others = [b for b in benches if b.get("extra_info", {}).get("group") not in grouped]
    if others:
        lines += ["| benchmark | median (ms) |", "|---|---:|"]
        lines += [f"| {b['name']} | {_median(b) * 1e3:.3f} |" for b in others]
    return "\n".join(lines) + "\n"


def _group(benches: list[dict], name: str) -> list[dict]:
    return [b for b in benches if b.get("extra_info", {}).get("group") == name]


def _kernel_table(benches: list[dict]) -> list[str]:
    """Per op and pass: eager, torch.compile and Triton medians, the ratios, and the Triton
    kernel's GB/s as a share of the measured copy bandwidth."""
    kernels, copy = _group(benches, "kernel"), _group(benches, "copy")
    if not kernels:
        return []
    copy_gbs = copy[0]["extra_info"]["bytes"] / _median(copy[0]) / 1e9 if copy else None
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for b in kernels:
        ex = b["extra_info"]
        table.setdefault((ex["op"], ex["pass_"]), {})[ex["impl"]] = b
    lines = [f"Copy bandwidth (device-to-device, 512 MiB): {copy_gbs:.0f} GB/s" if copy_gbs else
             "Copy bandwidth: not measured", "",
             "| kernel | pass | shape, dtype | eager (ms) | compile (ms) | triton (ms) | vs eager | vs compile | "
             "triton GB/s | % of copy |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (op, pass_), impls in table.items():
        eager, compiled, fused = (impls.get(k) for k in ("eager", "compile", "triton"))
        ms = [f"{_median(b) * 1e3:.3f}" if b else "-" for b in (eager, compiled, fused)]
        ex = (fused or eager or compiled)["extra_info"]
        ratio = [f"{_median(ref) / _median(fused):.2f}x" if ref and fused else "-" for ref in (eager, compiled)]
        gbs = ex["bytes"] / _median(fused) / 1e9 if fused else None
        share = f"{100 * gbs / copy_gbs:.0f}%" if gbs and copy_gbs else "-"
        lines.append(f"| {op} | {pass_} | {'x'.join(map(str, ex['shape']))}, {ex['dtype'].removeprefix('torch.')} | "
                     f"{' | '.join(ms)} | {' | '.join(ratio)} | {f'{gbs:.0f}' if gbs else '-'} | {share} |")
    return lines + [""]


def _attention_table(benches: list[dict]) -> list[str]:
    """Per shape: every backend's median, what auto chose, and auto against the best backend."""
    rows: dict[str, dict[str, dict]] = {}
    for b in _group(benches, "attention"):
        rows.setdefault(b["extra_info"]["shape"], {})[b["extra_info"]["backend"]] = b
    if not rows:
        return []
    names = sorted({n for r in rows.values() for n in r if n != "auto"})
    lines = [f"| attention shape [B, H, Lq, Dh, Lk] | {' | '.join(f'{n} (ms)' for n in names)} | auto (ms) | "
             "auto chose | auto vs best |", "|---|" + "---:|" * (len(names) + 3)]
    for shape, by_name in rows.items():
        fixed = {n: _median(b) for n, b in by_name.items() if n != "auto"}
        auto = by_name.get("auto")
        best = min(fixed.values()) if fixed else None
        dims = (auto or next(iter(by_name.values())))["extra_info"]["dims"]
        cells = [f"{fixed[n] * 1e3:.3f}" if n in fixed else "-" for n in names]
        verdict = f"{100 * (_median(auto) / best - 1):+.1f}%" if auto and best else "-"
        lines.append(f"| {shape} {dims} | {' | '.join(cells)} | {f'{_median(auto) * 1e3:.3f}' if auto else '-'} | "
                     f"{auto['extra_info']['chosen'] if auto else '-'} | {verdict} |")
    return lines + [""]


def _end_to_end_table(benches: list[dict]) -> list[str]:
    paths: dict[str, dict[str, dict]] = {}
    for b in _group(benches, "e2e"):
        paths.setdefault(b["extra_info"]["path"], {})[b["extra_info"]["impl"]] = b
    if not paths:
        return []
    lines = ["| end to end | eager (ms) | fused (ms) | speed-up |", "|---|---:|---:|---:|"]
    for path, impls in paths.items():
        eager, fused = impls.get("eager"), impls.get("fused")
        cells = [f"{_median(b) * 1e3:.2f}" if b else "-" for b in (eager, fused)]
        ratio = f"{_median(eager) / _median(fused):.2f}x" if eager and fused else "-"
        lines.append(f"| {path} | {' | '.join(cells)} | {ratio} |")
    return lines + [""]


def render_file(json_path: Path) -> Path:
    """Write the markdown table next to the JSON; returns its path."""
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LimnerError(f"cannot read benchmark results {json_path}: {exc}") from None
    md = Path(json_path).with_suffix(".md")
    write_text_atomic(md, render(data))
    return md
