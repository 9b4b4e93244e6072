"""The benchmark report: ratios, bandwidth shares and auto-vs-best computed from the JSON."""
import os

from limner.bench import render


def bench(group, median, **info):
    return {"name": f"{group}-{info}", "stats": {"median": median}, "extra_info": {"group": group, **info}}


def test_render_computes_ratios_bandwidth_and_auto_verdict():
    kernel = dict(op="geglu", pass_="forward", bytes=10**9, shape=[8, 4096, 2560], dtype="torch.bfloat16")
    data = {"machine_info": {"cpu": {"brand_raw": "EPYC"}, "python_version": "3.11"},
            "limner": {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6"},
            "benchmarks": [
                bench("copy", 1e-3, bytes=2 * 10**9),
                bench("kernel", 2e-3, impl="eager", **kernel), bench("kernel", 1.5e-3, impl="compile", **kernel),
                bench("kernel", 1e-3, impl="triton", **kernel),
                bench("attention", 1e-3, shape="dit", backend="sdpa", chosen="sdpa", dims=[8, 16, 256, 72, 256]),
                bench("attention", 2e-3, shape="dit", backend="triton", chosen="triton", dims=[8, 16, 256, 72, 256]),
                bench("attention", 1.02e-3, shape="dit", backend="auto", chosen="sdpa", dims=[8, 16, 256, 72, 256]),
                bench("e2e", 3e-3, path="unet step", impl="eager"), bench("e2e", 2e-3, path="unet step", impl="fused"),
            ]}
    md = render(data)
    assert "NVIDIA H100" in md and "triton 3.6" in md
    assert "Copy bandwidth (device-to-device, 512 MiB): 2000 GB/s" in md
    assert "| geglu | forward | 8x4096x2560, bfloat16 | 2.000 | 1.500 | 1.000 | 2.00x | 1.50x | 1000 | 50% |" in md
    assert "| dit [8, 16, 256, 72, 256] | 1.000 | 2.000 | 1.020 | sdpa | +2.0% |" in md
    assert "| unet step | 3.00 | 2.00 | 1.50x |" in md


def _anchors_module():
    import importlib.util

    from limner.bench import BENCH_DIR

    spec = importlib.util.spec_from_file_location("anchors_under_test", BENCH_DIR / "anchors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_side_by_side_alternates_sides_and_reports_per_round_ratios():
    anchors = _anchors_module()
    calls = []
    result = anchors.alternate(lambda: calls.append("ours"), lambda: calls.append("anchor"), rounds=4, reps=1,
                               sync=lambda: None)
    timed = calls[4:]  # after two warm-up calls each
    assert timed == ["ours", "anchor", "anchor", "ours", "ours", "anchor", "anchor", "ours"]
    assert result["rounds"] == 4 and result["ratio_q1"] <= result["ratio"] <= result["ratio_q3"]


def test_side_by_side_table_shows_ratios_quartiles_and_start_up():
    anchors = _anchors_module()
    data = {"datetime": "2026-11-24T00:00:00+00:00",
            "machine": {"cpu": "x86_64", "threads": 2, "device": "cpu", "python": "3.11"},
            "versions": {"torch": "2.13", "diffusers": "0.42", "k_diffusion": "0.1.1", "limner": "0.1.0"},
            "model": {"config": "configs/shapes-unet.toml", "params": {"limner": 2.1e6, "diffusers": 2.04e6},
                      "text_encoder": "minilm (frozen)"},
            "rows": [{"workload": "training step", "limner": "eager", "anchor": "diffusers eager", "limner_ms": 100.0,
                      "anchor_ms": 150.0, "ratio": 1.5, "ratio_q1": 1.4, "ratio_q3": 1.6, "compile_s": 12.0}],
            "notes": {"max_abs_diff_vs_k_diffusion_dpmpp_2m": 2e-6},
            "startup": {"limner plugins": {"wall_s": 0.06, "peak_rss_mib": 19.0, "runs": 5}}}
    md = anchors.render(data)
    assert "| training step | eager | diffusers eager | 100.0 | 150.0 | **1.50x** | 1.40-1.60 | 12.0 |" in md
    assert "largest |difference| 2.0e-06" in md
    assert "| limner plugins | 0.06 | 19 |" in md


def test_bench_anchors_without_its_extra_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    import pytest

    from limner.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--anchors", "--quick"])
    assert exit_.value.code == 1
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_measured_children_never_import_the_repository_folders(tmp_path, monkeypatch):
    """Started in the repository root, a `python -c` child would import limner's top-level
    kernels/ folder as `kernels`, shadowing Hugging Face's package that diffusers imports
    (issue 24): run_process keeps the working folder off the child's sys.path."""
    from limner.bench import BENCH_DIR

    root = BENCH_DIR.parent
    assert (root / "kernels").is_dir()
    monkeypatch.chdir(root)
    anchors = _anchors_module()
    probe = ("import importlib.util as u, os, sys; s = u.find_spec('kernels'); "
             f"sys.exit(3 if s is not None and os.path.dirname(s.origin or '') == {str(root / 'kernels')!r} else 0)")
    wall, rss = anchors.run_process(["-c", probe], dict(os.environ), tmp_path / "peak_kib")
    assert wall > 0 and rss > 0


def test_cpu_name_says_which_amd_core_a_bare_model_name_hides(monkeypatch):
    """The VMs of this project's kind call Zen 4 and Zen 5 alike "AMD EPYC": cpu_name adds the core
    from cpuinfo's family and model, so their results files get different names; Intel's and a
    name that already says it stay as they are."""
    import limner.bench as bench
    import limner.kernels

    def cpuinfo(text):
        monkeypatch.setattr(limner.kernels, "cpuinfo", lambda: text)

    amd = "vendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: {}\n"
    for family, model, name, want in [(25, 17, "AMD EPYC", "AMD EPYC (Zen 4)"), (26, 2, "AMD EPYC", "AMD EPYC (Zen 5)"),
                                      (25, 1, "AMD EPYC", "AMD EPYC (Zen 3)"), (23, 49, "AMD EPYC", "AMD EPYC"),
                                      (25, 17, "AMD EPYC Zen 4", "AMD EPYC Zen 4")]:
        cpuinfo(amd.format(family, model, name) + amd.format(1, 1, "other cores are not read"))
        assert bench.cpu_name() == want
    cpuinfo("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor\n")
    assert bench.cpu_name() == "Intel(R) Xeon(R) Processor" and bench.cpu_slug() == "intel-xeon"
    cpuinfo(amd.format(25, 17, "AMD EPYC"))
    assert bench.cpu_slug() == "amd-epyc-zen-4"
