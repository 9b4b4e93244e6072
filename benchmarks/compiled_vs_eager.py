"""The demo UNet (configs/shapes-unet.toml) eager against torch.compile on the CPU, in one process,
each side called in turn: the guided forward as `limner sample --compile` compiles it (static
shapes, inductor's freezing) and the training step as `train.compile = true` does (benchmarks/
anchors.py's steps). The sides: eager; compiled, limner's C++ kernels inside the graph as custom
ops (kernels/_cpp.py); and for the forward compiled with inductor's own code for every op (traced
and run with LIMNER_KERNELS=eager and LIMNER_ATTENTION=sdpa, as compiled graphs were before the
kernels became custom ops). Compile seconds are a first call's with whatever inductor's cache holds.
With --sd15, a third row: one guided forward of a Stable Diffusion 1.5-size UNet (random weights,
benchmarks/sd_full_size.py; batch 2, 64x64 latent, 77 tokens) in bfloat16 as `limner sample
--dtype bf16 --compile` runs it, eager, compiled, and compiled with torch's sdpa for attention (as
compiled graphs ran before limner's bf16 attention kernel could be traced).

    python benchmarks/compiled_vs_eager.py [--runs N] [--sd15]

writes benchmarks/results/compiled-vs-eager-<cpu>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from anchors import Sides, compiled_for_inference, environment, force_eager_kernels, timed
from in_turn import in_turn, medians, spread

from limner.bench import cpu_name, cpu_slug

RESULTS = Path(__file__).parent / "results"


def inside(context, run):
    """`run` with `context()` around every call: an environment read while traced stays set while run."""
    def wrapped():
        with context():
            return run()
    return wrapped


def forward_sides(s: Sides) -> tuple[dict, dict]:
    eager = s.limner_forward(s.ours, True)
    compiled, compile_s = compiled_for_inference(s.ours, lambda m: s.limner_forward(m, True))
    with force_eager_kernels():
        own, own_s = compiled_for_inference(s.ours, lambda m: s.limner_forward(m, True))
    return ({"eager": eager, "compiled": compiled, "compiled, inductor's own code": inside(force_eager_kernels, own)},
            {"compiled": compile_s, "compiled, inductor's own code": own_s})


def train_sides(s: Sides) -> tuple[dict, dict]:
    """Eager and compiled only: a second compiled copy would reuse the first one's graph (its
    parameters are graph inputs, so dynamo's guards pass for any copy), whatever LIMNER_KERNELS says."""
    model = copy.deepcopy(s.ours)
    model.compile(dynamic=False)
    steps = {"eager": s.limner_train_step(copy.deepcopy(s.ours), channels_last=True),
             "compiled": s.limner_train_step(model, channels_last=True)}
    return steps, {"compiled": timed(steps["compiled"])}


def sd15_sides(folder: Path) -> tuple[dict, dict]:
    """limner's SD 1.5-size UNet in bf16 (loaded as `limner sample --dtype bf16` loads it), each call
    inside the sampling malloc block (limner.pipeline.freed_memory_kept) as when sampling."""
    import limner
    from limner.pipeline import autocast, freed_memory_kept
    from limner.protocols import TextEmbedding

    torch.manual_seed(0)
    x, ctx, sigma = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.full((2,), 3.0)
    cond = TextEmbedding(tokens=ctx, mask=torch.ones(2, 77, dtype=torch.bool), pooled=ctx[:, 0])
    pipe = limner.load_pipeline(folder / "model.safetensors", device="cpu", dtype="bfloat16")
    x = x.contiguous(memory_format=pipe.memory_format)

    def forward(unet):
        def run():
            with torch.no_grad(), autocast(pipe.dtype, torch.device("cpu")), freed_memory_kept():
                return unet(x, sigma, cond)
        return run

    unet = pipe.model.denoiser
    compiled, compile_s = compiled_for_inference(unet, forward)
    sdpa_attention = partial(environment, LIMNER_ATTENTION="sdpa")  # read when the graph is traced
    with sdpa_attention():
        sdpa, sdpa_s = compiled_for_inference(unet, forward)
    return ({"eager": forward(unet), "compiled": compiled,
             "compiled, torch's sdpa for attention": inside(sdpa_attention, sdpa)},
            {"compiled": compile_s, "compiled, torch's sdpa for attention": sdpa_s})


def render(data: dict) -> str:
    lines = ["# limner eager and compiled on the CPU\n",
             f"{data['cpu']}, {data['threads']} threads, torch {data['torch']}, {data['date']}; "
             f"`python benchmarks/compiled_vs_eager.py --runs {data['runs']}{' --sd15' if data.get('sd15') else ''}` "
             "(training rows: a third as many runs; the SD 1.5-size row a tenth, at least 2). Medians of the "
             "runs, each side called in turn; speed-up = eager / this side. \"compiled\": limner's C++ kernels "
             "(Winograd convolutions, GroupNorm + SiLU, GEGLU, attention) inside the graph as custom ops; "
             "\"inductor's own code\": every op compiled by inductor (traced with LIMNER_KERNELS=eager, "
             "LIMNER_ATTENTION=sdpa), as compiled graphs ran before the kernels became custom ops (the forward "
             "only: `train_sides` says why); \"torch's sdpa for attention\": limner's kernels but torch's "
             "attention, as bf16 graphs ran before limner's bf16 attention kernel could be traced. Compile: the "
             "first call's seconds, inductor's cache as the machine had it.\n",
             "| workload | side | ms | speed-up over eager | [min, max] ms | compile s |",
             "|---|---|---:|---:|---|---:|"]
    for workload, row in data["rows"].items():
        for side, ms in row["ms"].items():
            low, high = row["spread_ms"][side]
            compile_s = f"{row['compile_s'][side]:.1f}" if side in row["compile_s"] else "-"
            lines.append(f"| {workload} | {side} | {ms:.1f} | **{row['ms']['eager'] / ms:.2f}x** | "
                         f"[{low:.1f}, {high:.1f}] | {compile_s} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="forward runs a side (training: a third as many)")
    parser.add_argument("--sd15", action="store_true", help="add the SD 1.5-size bf16 forward (a tenth as many runs)")
    args = parser.parse_args()
    s = Sides(torch.device("cpu"))
    data = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "sd15": args.sd15, "rows": {}}
    workloads = [("denoiser forward, guided batch 2x4 at 32x32", lambda: forward_sides(s), args.runs),
                 ("training step, batch 16 (forward + backward + AdamW)", lambda: train_sides(s),
                  max(1, args.runs // 3))]
    tmp = tempfile.TemporaryDirectory(dir="/tmp")
    if args.sd15:
        import sd_full_size

        sd_full_size.build("sd15", Path(tmp.name))
        workloads.append(("SD 1.5-size UNet forward in bf16, guided batch 2 at a 64x64 latent",
                          lambda: sd15_sides(Path(tmp.name)), max(2, args.runs // 10)))
    for workload, make, runs in workloads:
        sides, compile_s = make()
        times = in_turn(sides, runs)
        data["rows"][workload] = {"ms": {k: v * 1e3 for k, v in medians(times).items()},
                                  "spread_ms": {k: [v * 1e3 for v in lo_hi] for k, lo_hi in spread(times, 4).items()},
                                  "compile_s": compile_s}
        print(render(data), flush=True)
        del sides
    tmp.cleanup()
    out = RESULTS / f"compiled-vs-eager-{cpu_slug()}"
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(f"Wrote {out}.md and .json")


if __name__ == "__main__":
    main()
