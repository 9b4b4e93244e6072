"""The benchmark report: ratios, bandwidth shares and auto-vs-best computed from the JSON."""
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
