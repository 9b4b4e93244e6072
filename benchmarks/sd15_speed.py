"""Stable Diffusion 1.5 at full size on this CPU, limner against the tools people run it with
(issue 28): diffusers (eager PyTorch) and OpenVINO (optimum-intel's export of the same diffusers
folder), in float32 and bfloat16. Random weights, the same ones on every side (speed does not
depend on their values): sd_full_size.build writes one original-layout file for limner and a
diffusers folder for the others.

Rows:
- forward: one guided UNet call (batch 2, 64x64 latent, 77 tokens), limner's `sd_unet` and
  diffusers' UNet2DConditionModel on the same weights in one process, called in turn, medians
  and [min, max];
- image: one 512x512 image in 20 Euler steps, guidance 7.5 (text encoder, UNet, VAE decode),
  each side in a fresh process: seconds to load, seconds for the image, the whole cold process
  (start to image, imports included) and its peak RSS. With --compile, a bfloat16 limner row and
  a bfloat16 diffusers row compile the UNet first (torch.compile, static shapes, inductor with
  freezing, on both sides) and draw a second image: the first is the cold cost, the second the
  steady one.

bfloat16 is each tool's own way: limner loaded with dtype bf16 (its UNet's linear and
convolution weights held in bf16, norms in float32, the sampler's state in float32), diffusers
loaded with torch_dtype=torch.bfloat16 (the whole pipeline in bf16), OpenVINO with
INFERENCE_PRECISION_HINT bf16 (f32 for the float32 rows: its CPU plugin would pick bf16 itself).

ONNX Runtime (--onnxruntime, float32 only: its CPU execution provider has no bfloat16
convolutions): the diffusers folder's text encoder, UNet and VAE decoder exported to ONNX once
(`export_onnxruntime`, not timed) and run by diffusers' OnnxStableDiffusionPipeline with the same
tokenizer (DDIM in place of Euler: `image_onnxruntime` says why; the same 20 UNet calls).
onnxruntime and onnx must be importable (`pip install --target DIR onnxruntime onnx`,
PYTHONPATH=DIR): an anchor of the benchmarks only, never a limner dependency:

    PYTHONPATH=DIR python benchmarks/sd15_speed.py --onnxruntime --only "ONNX Runtime,limner float32" --rounds 2

OpenVINO needs an environment of its own (optimum-intel 2.2 pins huggingface-hub below the
diffusers in limner's): give its python with --openvino, e.g.

    python -m venv /tmp/ov && /tmp/ov/bin/pip install torch==2.13.0 "optimum-intel[openvino]==2.2.0" \\
        transformers==5.5.4 "diffusers==0.39.*" "huggingface-hub==1.21.*" "datasets<5"
    python benchmarks/sd15_speed.py --openvino /tmp/ov/bin/python [--compile]
    python benchmarks/sd15_speed.py --only bfloat16 --rounds 2   # rerun the rows naming it, keep the others
    python benchmarks/sd15_speed.py --render          # the table again from the JSON
    python benchmarks/sd15_speed.py --results benchmarks/results/sd15-speed-amd-epyc.json  # another CPU's file

Writes benchmarks/results/sd15-speed.{json,md} (or --results FILE and its .md) after every row (a
failing row is recorded with its error and the others go on). --rounds N runs every image side N
times, round by round (sides alternating), and reports medians with each run kept.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "sd15-speed.json"
STEPS, GUIDANCE, SIZE, PROMPT = 20, 7.5, 512, "a watercolour fox in a snowy forest"


def forward_rows(folder: Path, runs: int) -> dict:
    """limner's and diffusers' UNet on the same weights, one guided forward each in turn, both inside
    limner.pipeline.freed_memory_kept (glibc keeps freed blocks, as while limner samples: Winograd's
    per-call buffers would otherwise be fresh mappings faulted in at every call; diffusers' calls
    run in it too)."""
    import diffusers
    import torch
    from in_turn import in_turn, medians, spread

    import limner
    from limner.protocols import TextEmbedding

    torch.manual_seed(0)
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    cond = TextEmbedding(tokens=ctx, mask=torch.ones(2, 77, dtype=torch.bool), pooled=ctx[:, 0])
    sigma = torch.full((2,), 3.0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        ours = limner.load_pipeline(folder / "model.safetensors", device="cpu", dtype=dtype)
        unet = ours.model.denoiser
        t = torch.full((2,), 500.0)  # any timestep: speed does not depend on it
        theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "diffusers" / "unet",
                                                                torch_dtype=getattr(torch, dtype)).eval()
        xl = x.contiguous(memory_format=ours.memory_format)

        dt = getattr(torch, dtype)

        def limner_call(unet=unet, xl=xl, compute=ours.dtype):
            with torch.no_grad(), limner.pipeline.autocast(compute, torch.device("cpu")):
                unet(xl, sigma, cond)

        def diffusers_call(theirs=theirs, dt=dt, t=t):
            with torch.no_grad():
                theirs(x.to(dt), t, encoder_hidden_states=ctx.to(dt))

        with limner.pipeline.freed_memory_kept():  # as limner samples; diffusers' calls gain from it too
            times = in_turn({"limner": limner_call, "diffusers": diffusers_call}, runs)
        med = medians(times)
        out[dtype] = {"limner_s": round(med["limner"], 3), "diffusers_s": round(med["diffusers"], 3),
                      "speedup": round(med["diffusers"] / med["limner"], 2), "runs": runs,
                      "spread": spread(times, 3)}
        del ours, unet, theirs
    return out


def image_limner(folder: Path, dtype: str, compile_: bool) -> dict:
    import torch

    import limner

    start = time.perf_counter()
    pipe = limner.load_pipeline(folder / "model.safetensors", device="cpu", dtype=dtype)
    if compile_:
        pipe.compile()
    out = {"load_s": time.perf_counter() - start}
    for key in ("image_s", "next_image_s") if compile_ else ("image_s",):
        start = time.perf_counter()
        with torch.no_grad():
            pipe.generate([PROMPT], sampler="euler", steps=STEPS, guidance=GUIDANCE, seed=0, size=SIZE)
        out[key] = time.perf_counter() - start
    return out


def image_diffusers(folder: Path, dtype: str, compile_: bool) -> dict:
    import diffusers
    import torch
    import torch._inductor.config as inductor_config

    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder / "diffusers", torch_dtype=getattr(torch, dtype))
    if compile_:  # as limner compiles: the UNet, static shapes, inductor's freezing (below)
        pipe.unet = torch.compile(pipe.unet.requires_grad_(False), dynamic=False)
    out = {"load_s": time.perf_counter() - start}
    for key in ("image_s", "next_image_s") if compile_ else ("image_s",):
        start = time.perf_counter()
        with torch.no_grad(), inductor_config.patch(freezing=compile_):
            pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(0), output_type="pt")
        out[key] = time.perf_counter() - start
    return out


def image_openvino(folder: Path, dtype: str, compile_: bool) -> dict:
    import numpy as np
    from optimum.intel import OVStableDiffusionPipeline

    hint = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(folder / "openvino", ov_config={"INFERENCE_PRECISION_HINT": hint})
    pipe.compile()
    out = {"load_s": time.perf_counter() - start,  # what the compiled UNet says it runs in
           "precision": str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))}
    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
         generator=np.random.RandomState(0), output_type="np")
    out["image_s"] = time.perf_counter() - start
    return out


def export_openvino(folder: Path) -> None:
    """optimum-intel's export of the diffusers folder to OpenVINO IR (once; not in any row's time)."""
    from optimum.intel import OVStableDiffusionPipeline

    OVStableDiffusionPipeline.from_pretrained(folder / "diffusers", export=True, compile=False).save_pretrained(
        folder / "openvino")


ONNX_PARTS = ("text_encoder", "unet", "vae_decoder")


def onnx_export(module, fn, inputs: tuple, names: list[str], path: Path) -> None:
    """`fn(*inputs)` (one tensor out, named "out"), whose weights `module` holds, exported to ONNX at
    `path`: torch.onnx.export's TorchScript exporter, opset 17, fixed shapes (large weights go to
    external data files beside it)."""
    import torch

    class Part(torch.nn.Module):  # positional inputs and one tensor out, as the exporter wants them
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return fn(*args)

    with torch.no_grad():
        torch.onnx.export(Part(), inputs, str(path), input_names=names, output_names=["out"], opset_version=17,
                          dynamo=False)


def onnx_session(path: Path):
    """onnxruntime's CPU execution provider on `path`: every graph optimization, as many intra-op
    threads as torch uses."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnxruntime(folder: Path) -> None:
    """The diffusers folder's text encoder, UNet and VAE decoder exported to ONNX (torch.onnx.export's
    TorchScript exporter, opset 17, fixed shapes, as benchmarks/onnxruntime_anchor.py; once, not in
    any row's time), with the inputs diffusers' OnnxStableDiffusionPipeline feeds them."""
    import diffusers
    import torch
    import transformers

    src, out = folder / "diffusers", folder / "onnx"
    text = transformers.CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(src / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(src / "vae").eval()
    latent = SIZE // 8
    parts = {  # name: (module, forward, example inputs, input names)
        "text_encoder": (text, lambda ids: text(input_ids=ids).last_hidden_state,
                         (torch.zeros(1, 77, dtype=torch.int32),), ["input_ids"]),
        "unet": (unet, lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample,
                 (torch.randn(2, 4, latent, latent), torch.ones(1), torch.randn(2, 77, 768)),
                 ["sample", "timestep", "encoder_hidden_states"]),
        "vae_decoder": (vae, lambda z: vae.decode(z).sample, (torch.randn(1, 4, latent, latent),),
                        ["latent_sample"]),
    }

    for name in ONNX_PARTS:
        module, fn, inputs, names = parts[name]
        (out / name).mkdir(parents=True, exist_ok=True)
        onnx_export(module, fn, inputs, names, out / name / "model.onnx")


def image_onnxruntime(folder: Path) -> dict:
    """One float32 image (its CPU provider has no bfloat16 convolutions) by diffusers'
    OnnxStableDiffusionPipeline on the exported parts: onnxruntime's CPU execution provider, every
    graph optimization, torch's thread count; the diffusers folder's tokenizer, and DDIM on its
    scheduler's noise schedule: that pipeline keeps its latents in numpy and breaks on
    Euler's tensor init_noise_sigma, and DDIM makes the same 20 guided UNet calls, the time that
    counts."""
    import diffusers
    import numpy as np
    import transformers
    from diffusers import OnnxRuntimeModel, OnnxStableDiffusionPipeline

    start = time.perf_counter()
    parts = {name: OnnxRuntimeModel(onnx_session(folder / "onnx" / name / "model.onnx")) for name in ONNX_PARTS}
    pipe = OnnxStableDiffusionPipeline(
        vae_encoder=None, **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "diffusers" / "tokenizer"),
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "diffusers" / "scheduler"))
    out = {"load_s": time.perf_counter() - start}
    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
         generator=np.random.RandomState(0), output_type="np")
    out["image_s"] = time.perf_counter() - start
    return out


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's ru_maxrss would carry the parent's
    peak over fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 2**20


def child(python: str, call: str) -> dict:
    """`call` (a function of this file) in a fresh interpreter (-P: the repository root never
    shadows packages); its JSON result, with the whole process's seconds and peak RSS."""
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import sd15_speed as b; "
            f"r = b.{call}; r = r if isinstance(r, dict) else {{}}; r['peak_rss_gb'] = b.peak_rss_gb(); "
            "print(json.dumps(r))")
    start = time.perf_counter()
    done = subprocess.run([python, "-P", "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cold_process_s"] = time.perf_counter() - start
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def results_arg() -> str:
    """The --results part of the command that wrote RESULTS ("" for the default file)."""
    return "" if RESULTS == HERE / "results" / "sd15-speed.json" else f" --results {RESULTS}"


def main() -> None:
    import torch

    from limner.bench import cpu_name

    global RESULTS
    args = sys.argv[1:]
    if "--results" in args:  # one file per CPU: the machines of one kind differ (Intel Xeon, AMD EPYC)
        RESULTS = Path(args[args.index("--results") + 1])
    if "--render" in args:
        render(json.loads(RESULTS.read_text()))
        return
    openvino = args[args.index("--openvino") + 1] if "--openvino" in args else None
    onnxruntime = "--onnxruntime" in args
    compile_ = "--compile" in args
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 1
    command = ("python benchmarks/sd15_speed.py" + (" --openvino PYTHON" if openvino else "") +
               (" --onnxruntime" if onnxruntime else "") + (" --compile" if compile_ else "") +
               (f" --rounds {rounds}" if rounds > 1 else "") + results_arg())
    flags = Path("/proc/cpuinfo").read_text().split()
    data = {"cpu": cpu_name(), "flags": sorted({f for f in ("avx512_bf16", "amx_bf16") if f in flags}),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": command, "forward": {}, "image": {}, "failed": {}}

    def save():
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        render(data)

    only = args[args.index("--only") + 1].split(",") if "--only" in args else None
    if only is not None:  # rerun some rows, keep the others' results
        kept = json.loads(RESULTS.read_text())
        data.update({k: kept[k] for k in ("forward", "image", "failed", "note") if k in kept})  # the note: by hand

    def chosen(name: str) -> bool:
        return only is None or any(part in name for part in only)

    def row(table: str, name: str, fn) -> None:
        data["failed"].pop(f"{table}: {name}", None)
        print(f"{table}: {name} ...", flush=True)
        try:
            result = fn()
            if table == "image":  # runs kept; the row's figures are their medians
                runs = [*data["image"].get(name, {}).get("runs", []), result]
                result = {k: round(statistics.median(r[k] for r in runs), 3) for k in result
                          if isinstance(result[k], float)} | {"runs": runs}
            data[table][name] = result
        except Exception as e:  # noqa: BLE001 - a failing row is recorded, the others go on
            traceback.print_exc()
            data["failed"][f"{table}: {name}"] = f"{type(e).__name__}: {e}"
        save()

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = Path(tmp)
        sys.path.insert(0, str(HERE))
        import sd_full_size

        print("building the weights ...", flush=True)
        sd_full_size.build("sd15", folder)
        if chosen("UNet forward"):
            row("forward", "UNet forward", lambda: forward_rows(folder, 3))
        here, path = sys.executable, f"b.Path({tmp!r})"
        sides = []  # (name, python, call), run round by round so that the sides alternate
        for dtype in ("float32", "bfloat16"):
            sides.append((f"limner {dtype}", here, f"image_limner({path}, {dtype!r}, False)"))
            sides.append((f"diffusers {dtype}", here, f"image_diffusers({path}, {dtype!r}, False)"))
            if compile_ and dtype == "bfloat16":  # float32's forward gained nothing from it here (3.17 s vs 3.2 s)
                sides.append((f"limner {dtype} compiled", here, f"image_limner({path}, {dtype!r}, True)"))
                sides.append((f"diffusers {dtype} compiled", here, f"image_diffusers({path}, {dtype!r}, True)"))
        if openvino:
            sides += [(f"OpenVINO {dtype}", openvino, f"image_openvino({path}, {dtype!r}, False)")
                      for dtype in ("float32", "bfloat16")]
        if onnxruntime:  # float32 only: its CPU provider has no bfloat16 convolutions
            sides.append(("ONNX Runtime float32", here, f"image_onnxruntime({path})"))
        sides = [side for side in sides if chosen(side[0])]
        for tool, python, call in (("OpenVINO", openvino, f"export_openvino({path})"),
                                   ("ONNX Runtime", here, f"export_onnxruntime({path})")):
            its = [side for side in sides if side[0].startswith(tool)]
            if not its:
                continue
            start = time.perf_counter()
            try:
                child(python, call)
                data[f"{tool.lower().replace(' ', '')}_export_s"] = round(time.perf_counter() - start, 1)
            except Exception as e:  # noqa: BLE001 - its rows fail, the others go on
                traceback.print_exc()
                data["failed"].update({f"image: {name}": f"export: {type(e).__name__}: {e}" for name, *_ in its})
                sides = [side for side in sides if side not in its]
                save()
        for name, *_ in sides:
            data["image"].pop(name, None)  # fresh runs (a side whose export failed keeps its earlier row)
        for _ in range(rounds):
            for name, python, call in sides:
                row("image", name, partial(child, python, call))
        data["command"] = (command + (f" --only {shlex.quote(','.join(only))}" if only else "") +
                           (f"; other rows: {kept['command']}" if only else ""))  # each earlier run's command kept
    save()


def render(data: dict) -> None:
    lines = ["# Stable Diffusion 1.5 at full size on the CPU: limner, diffusers, OpenVINO, ONNX Runtime (issue 28)",
             "",
             f"Machine: {data['cpu']} ({', '.join(data['flags']) or 'no native bf16'}), {data['threads']} threads; "
             f"torch {data['torch']}; {data['date']}. Command: `{data['command']}`. SD 1.5's architecture with random "
             "weights, the same on every side. bfloat16 is each tool's own way (the script's docstring).", ""]
    if data.get("note"):  # what a partial rerun (--only) changed about the rows' comparability, said by hand
        lines += [f"Note: {data['note']}", ""]
    if data["forward"]:
        lines += ["One guided UNet forward (batch 2, 64x64 latent), both sides in one process called in turn, "
                  "inside limner's sampling malloc block (freed blocks kept: `limner.pipeline.freed_memory_kept`) "
                  "for both:", "",
                  "| dtype | limner s | diffusers s | limner's speed-up | spread limner / diffusers |",
                  "|---|---:|---:|---:|---|"]
        for dtype, r in data["forward"]["UNet forward"].items():
            lines.append(f"| {dtype} | {r['limner_s']} | {r['diffusers_s']} | **{r['speedup']}x** | "
                         f"{r['spread']['limner']} / {r['spread']['diffusers']} |")
        lines.append("")
    rows = {k: v for k, v in data["image"].items() if "image_s" in v}
    if rows:
        lines += [f"One {SIZE}x{SIZE} image, {STEPS} Euler steps, guidance {GUIDANCE}, each side in a fresh process "
                  "per run (medians of the runs, sides alternating run by run; [min, max] of the image time):", "",
                  "| side | runs | load s | image s | next image s | cold process to image s | peak RSS GB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            runs = r.get("runs", [r])
            spread = f" [{min(x['image_s'] for x in runs)}, {max(x['image_s'] for x in runs)}]" if len(runs) > 1 else ""
            lines.append(f"| {name} | {len(runs)} | {r['load_s']} | {r['image_s']}{spread} | "
                         f"{r.get('next_image_s', '')} | {r['cold_process_s']} | {r['peak_rss_gb']} |")
        lines.append("")
        for dtype in ("float32", "bfloat16"):
            ours = rows.get(f"limner {dtype}")
            if ours is None:
                continue
            best = min((r.get("next_image_s", r["image_s"]) for n, r in rows.items()
                        if n.startswith("limner") and dtype in n))
            for other in ("diffusers", "OpenVINO", "ONNX Runtime"):
                theirs = rows.get(f"{other} {dtype}")
                if theirs:
                    lines.append(f"- {dtype}: limner {theirs['image_s'] / ours['image_s']:.2f}x {other} eager-to-eager "
                                 f"image time, {theirs['image_s'] / best:.2f}x with limner's best ({best:.1f} s).")
            full = rows.get("limner float32")
            if dtype == "bfloat16" and full:
                lines.append(f"- bfloat16: limner's image {full['image_s'] / ours['image_s']:.2f}x its float32 image "
                             f"({ours['image_s']:.1f} s vs {full['image_s']:.1f} s).")
            ours_c, theirs_c = rows.get(f"limner {dtype} compiled"), rows.get(f"diffusers {dtype} compiled")
            if ours_c and theirs_c:
                lines.append(f"- {dtype}: limner compiled {theirs_c['next_image_s'] / ours_c['next_image_s']:.2f}x "
                             f"diffusers compiled, second images ({ours_c['next_image_s']:.1f} s vs "
                             f"{theirs_c['next_image_s']:.1f} s); first images with the compile "
                             f"{ours_c['image_s']:.1f} s vs {theirs_c['image_s']:.1f} s.")
        lines.append("")
    if data.get("failed"):
        lines += ["Rows that failed:", ""] + [f"- {k}: {v}" for k, v in data["failed"].items()] + [""]
    (RESULTS.with_suffix(".md")).write_text("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
