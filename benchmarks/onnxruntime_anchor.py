"""ONNX Runtime beside limner at Stable Diffusion 1.5's size (issue 28's anchors): diffusers'
UNet2DConditionModel exported to ONNX (torch.onnx.export's TorchScript exporter, opset 17, fixed
shapes, the weights as external data) and run by onnxruntime's CPU execution provider (every graph
optimization, as many intra-op threads as torch uses), against limner's `sd_unet` on the same
weights: one guided float32 forward each (batch 2, 64x64 latent, 77 tokens), called in turn in one
process, both inside limner's sampling malloc block (as sd15_speed.py's forward row). Also how far
ONNX Runtime's output is from diffusers' own (the export's check).

FOLDER holds an SD 1.5-size original-layout file and the diffusers folder of the same weights, as
benchmarks/sd_full_size.py's `build("sd15", FOLDER)` writes them (model.safetensors, diffusers/).
onnxruntime and onnx are not limner dependencies: install them where this runs
(`pip install onnxruntime onnx`, or `pip install --target DIR` and PYTHONPATH=DIR).

    python benchmarks/onnxruntime_anchor.py FOLDER   # writes benchmarks/results/onnxruntime-<cpu>.{json,md}
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from in_turn import in_turn, medians, spread
from sd15_speed import onnx_export, onnx_session

HERE = Path(__file__).parent


def main(folder: Path, runs: int = 4) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("onnxruntime is not installed here: pip install onnxruntime onnx (an anchor of the "
                         "benchmarks only, never a limner dependency)") from None
    import diffusers
    import torch

    import limner
    from limner.bench import cpu_name, cpu_slug
    from limner.protocols import TextEmbedding

    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    t = torch.full((2,), 500.0)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "diffusers" / "unet").eval()

    def denoised(sample, timestep, context, unet=theirs):  # the exporter's positional inputs, one tensor out
        return unet(sample, timestep, encoder_hidden_states=context).sample

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, torch.no_grad():
        path = Path(tmp) / "unet.onnx"
        start = time.perf_counter()
        onnx_export(theirs, denoised, (x, t, ctx), ["sample", "timestep", "context"], path)
        export_s = time.perf_counter() - start
        reference = theirs(x, t, encoder_hidden_states=ctx).sample
        del theirs
        start = time.perf_counter()
        session = onnx_session(path)
        session_s = time.perf_counter() - start
        feed = {"sample": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy()}

        ours = limner.load_pipeline(folder / "model.safetensors", device="cpu", dtype="float32")
        unet, xl = ours.model.denoiser, x.contiguous(memory_format=ours.memory_format)
        cond = TextEmbedding(tokens=ctx, mask=torch.ones(2, 77, dtype=torch.bool), pooled=ctx[:, 0])
        sigma = torch.full((2,), 3.0)  # any noise level: speed does not depend on it

        def limner_call():
            return unet(xl, sigma, cond)

        def ort_call():
            return session.run(["out"], feed)[0]

        far_ort = float((torch.from_numpy(ort_call()) - reference).norm() / reference.norm())
        with limner.pipeline.freed_memory_kept():
            times = in_turn({"limner": limner_call, "onnxruntime": ort_call}, runs)
    med = medians(times)
    data = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/onnxruntime_anchor.py FOLDER", "runs": runs,
            "limner_s": round(med["limner"], 3), "onnxruntime_s": round(med["onnxruntime"], 3),
            "speedup": round(med["onnxruntime"] / med["limner"], 2), "spread": spread(times, 3),
            "export_s": round(export_s, 1), "session_s": round(session_s, 1),
            "onnxruntime_vs_diffusers": far_ort}
    out = HERE / "results" / f"onnxruntime-{cpu_slug()}"
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(render(data))


def render(data: dict) -> str:
    return "\n".join([
        "# ONNX Runtime beside limner at SD 1.5's size (issue 28)", "",
        f"Machine: {data['cpu']}, {data['threads']} threads; torch {data['torch']}, onnxruntime "
        f"{data['onnxruntime']}; {data['date']}. Command: `{data['command']}` (the script's docstring says what "
        "runs). SD 1.5's UNet architecture with random weights, the same on both sides; one guided float32 forward "
        f"(batch 2, 64x64 latent, 77 tokens), sides called in turn, medians of {data['runs']}.", "",
        "| side | forward s | spread |", "|---|---:|---|",
        f"| limner (`sd_unet`, eager) | {data['limner_s']} | {data['spread']['limner']} |",
        f"| ONNX Runtime (diffusers' UNet exported, CPU provider, all graph optimizations) | {data['onnxruntime_s']} | "
        f"{data['spread']['onnxruntime']} |", "",
        f"limner's speed-up: **{data['speedup']}x**. Export {data['export_s']} s, ONNX Runtime session "
        f"{data['session_s']} s; ONNX Runtime's output off diffusers' own by {data['onnxruntime_vs_diffusers']:.1e} "
        "(norm of the difference / norm).", ""])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
