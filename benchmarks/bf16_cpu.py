"""bfloat16 sampling on a CPU with native bf16 (issue 28): speed against float32, limner against
itself, and how far the images move; and one demo training step under bf16 autocast.

Rows, each side alternating with the other in one process (median of the runs):
- guided sampling on the shipped demo UNet (4 images, its default sampler, 20 steps);
- one guided forward (batch 2) of a UNet at Stable Diffusion 1.5's configuration (`sd_unet`:
  320/640/1280/1280 channels, 2 blocks a level, 8 heads, 77 context tokens of 768; random
  weights: speed does not depend on their values) at 32x32 and 64x64 latents (256 and 512 px),
  its convolutions as a pipeline runs them (limner.pipeline.kernel_convs: float32 3x3 ones by
  Winograd), inside freed_memory_kept as limner samples;
- one training step of the demo UNet, float32 against bf16 autocast (train.mixed_precision);
and the PSNR of bfloat16 images against float32 ones (same prompts and seeds) on the shipped
diffusion models and, with --sd FILE, on a Stable Diffusion single file (one 512x512 image, 10
Euler steps, guidance 7.5; random weights such as benchmarks/sd_full_size.py writes draw noise,
but the difference still measures what bf16 changes at that size). The bfloat16 side is what
`--dtype bf16` runs: the denoiser's linear and convolution weights held in bf16
(limner.pipeline.hold_weights), the rest in bf16 autocast.

    python benchmarks/bf16_cpu.py [--sd FILE]   # writes benchmarks/results/bf16-cpu.{json,md}
    python benchmarks/bf16_cpu.py --sd FILE --results benchmarks/results/bf16-cpu-amd-epyc-zen-4  # another CPU's
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

from in_turn import in_turn, medians, spread

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "bf16-cpu"
PROMPTS = ["a red circle at the top left", "a blue square at the center", "a large yellow triangle at the bottom right",
           "a green circle at the right", "a white square at the bottom", "a purple triangle at the left",
           "a small red square at the top", "a yellow circle at the bottom left"]
TWO = ["a red circle at the top left and a blue square at the bottom right",
       "a small white triangle at the center and a large green circle at the top"]


def alternate(fp32, bf16, runs: int) -> dict:
    """Median seconds of each side, called in turn (fp32 first, then bf16, ...) after one warm-up each."""
    times = in_turn({"float32": fp32, "bfloat16": bf16}, runs)
    med = medians(times)
    return {"float32_s": round(med["float32"], 4), "bfloat16_s": round(med["bfloat16"], 4),
            "speedup": round(med["float32"] / med["bfloat16"], 2), "runs": runs, "spread": spread(times, 4)}


def sd15_forward(latent: int, runs: int) -> dict:
    import torch

    import limner
    from limner.pipeline import autocast, freed_memory_kept, hold_weights, kernel_convs

    torch.manual_seed(0)
    model = limner.create("denoisers", "sd_unet", context_dim=768, image_size=latent).eval()
    model.to(memory_format=torch.channels_last)
    kernel_convs(model)  # as a pipeline runs its convolutions (float32: Winograd's)
    held = copy.deepcopy(model)  # a bf16 pipeline's denoiser: linear and convolution weights in bf16
    hold_weights(held, torch.bfloat16)
    x = torch.randn(2, 4, latent, latent).contiguous(memory_format=torch.channels_last)
    sigma = torch.full((2,), 3.0)
    from limner.protocols import TextEmbedding

    cond = TextEmbedding(tokens=torch.randn(2, 77, 768), mask=torch.ones(2, 77, dtype=torch.bool),
                         pooled=torch.randn(2, 768))

    def run(net, dtype):
        def go():
            with torch.no_grad(), autocast(dtype, torch.device("cpu")):
                net(x, sigma, cond)
        return go

    with freed_memory_kept():  # as limner samples
        out = alternate(run(model, torch.float32), run(held, torch.bfloat16), runs)
    out["weights_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return out


def demo_training(runs: int) -> dict:
    """One training step of the demo UNet (batch 16: forward, x0 loss, backward, fused AdamW,
    channels-last) in float32 and under bf16 autocast (what accelerate's mixed precision does)."""
    import torch

    import limner

    pipe = limner.load_pipeline(ROOT / "checkpoints" / "shapes-unet", device="cpu")
    unet = copy.deepcopy(pipe.model.denoiser).train().to(memory_format=torch.channels_last).requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    cond = pipe.model.encode(PROMPTS * 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=gen).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    sigma = torch.rand(16, generator=gen) * 3 + 0.1

    def step(bf16: bool):
        def go():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen).to(x)
                loss = (unet(noisy, sigma, cond).float() - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return go

    return alternate(step(False), step(True), runs)


def demo_sampling(runs: int) -> dict:
    import limner

    full = limner.load_pipeline(ROOT / "checkpoints" / "shapes-unet")
    half = limner.load_pipeline(ROOT / "checkpoints" / "shapes-unet", dtype="bf16")
    return alternate(lambda: full.generate(PROMPTS[:4], seed=0, steps=20),
                     lambda: half.generate(PROMPTS[:4], seed=0, steps=20), runs)


def difference(full, half) -> dict:
    mse = float(((full - half) / 2).pow(2).mean())
    return {"images": len(full), "psnr_db": round(-10 * math.log10(mse), 1),
            "max_pixel_diff_of_255": round(float((full - half).abs().max()) * 127.5, 1)}


def psnr_rows(sd: str | None) -> dict:
    import limner

    out = {}
    for name, prompts in (("shapes-unet", PROMPTS), ("shapes-dit", PROMPTS), ("shapes2-unet", TWO * 4)):
        pipe = limner.load_pipeline(ROOT / "checkpoints" / name)
        seeds = list(range(len(prompts)))
        out[name] = difference(pipe.generate(prompts, seed=seeds), pipe.generate(prompts, seed=seeds, dtype="bf16"))
    if sd:
        options = {"sampler": "euler", "steps": 10, "guidance": 7.5, "seed": 0, "size": 512}
        full = limner.load_pipeline(sd, device="cpu").generate(["a watercolour fox in a snowy forest"], **options)
        half = limner.load_pipeline(sd, device="cpu", dtype="bf16").generate(["a watercolour fox in a snowy forest"],
                                                                            **options)
        out["SD 1.5 architecture, random weights, 512x512, 10 steps"] = difference(full, half)
    return out


def render(data: dict) -> str:
    lines = ["# bfloat16 sampling on the CPU", "",
             f"Machine: {data['cpu']} ({', '.join(data['flags'])}), {data['threads']} threads; torch "
             f"{data['torch']}. Command: `{data.get('command', 'python benchmarks/bf16_cpu.py')}` ({data['date']}). "
             "Each row alternates "
             "float32 and bfloat16 calls in one process; medians, with [min, max] of the runs.", "",
             "| workload | float32 | bfloat16 | speed-up | spread fp32 / bf16 |", "|---|---|---|---|---|"]
    for name, r in data["speed"].items():
        lines.append(f"| {name} | {r['float32_s']:.3f} s | {r['bfloat16_s']:.3f} s | **{r['speedup']}x** | "
                     f"{r['spread']['float32']} / {r['spread']['bfloat16']} |")
    lines += ["", "Images in bfloat16 against float32 (same prompts and seeds, each model's default sampler):", "",
              "| model | images | PSNR | largest pixel difference (of 255) |", "|---|---|---|---|"]
    for name, r in data["psnr"].items():
        lines.append(f"| {name} | {r['images']} | {r['psnr_db']} dB | {r['max_pixel_diff_of_255']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    import torch

    from limner.bench import cpu_name
    from limner.pipeline import native_bf16

    if not native_bf16():
        raise SystemExit("this CPU has no native bf16 (avx512_bf16 or amx_bf16): nothing to measure")
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16", "amx_tile")
                    if f in Path("/proc/cpuinfo").read_text().split()})
    speed = {"demo UNet, guided sampling, 4 images, 20 steps": demo_sampling(5),
             "SD 1.5-size UNet, one guided forward (batch 2), 32x32 latent": sd15_forward(32, 3),
             "SD 1.5-size UNet, one guided forward (batch 2), 64x64 latent": sd15_forward(64, 2),
             "demo UNet, one training step (batch 16; bf16: autocast)": demo_training(10)}
    results = Path(sys.argv[sys.argv.index("--results") + 1]) if "--results" in sys.argv else RESULTS
    data = {"command": "python benchmarks/bf16_cpu.py" + (" --sd FILE" if "--sd" in sys.argv else "") +
            (f" --results {results}" if results != RESULTS else ""),
            "cpu": cpu_name(), "flags": flags, "threads": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "speed": speed,
            "psnr": psnr_rows(sys.argv[sys.argv.index("--sd") + 1] if "--sd" in sys.argv else None)}
    results.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    results.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
