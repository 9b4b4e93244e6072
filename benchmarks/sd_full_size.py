"""Stable Diffusion 1.5 at full size, random weights, on this CPU: limner loading the original-layout
single file against diffusers loading the same weights from its own folder; each side samples
512x512 images in 20 Euler steps with guidance 7.5 in a process of its own (peak RSS is per
process). Speed does not depend on the weights' values; the numbers are for issue 26 (load time,
seconds per step, peak memory), not speed claims (issue 28).

    python benchmarks/sd_full_size.py [benchmarks/results/sd15-full-size.json]
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, SIZE, GUIDANCE, PROMPT = 20, 512, 7.5, "a watercolour fox in a snowy forest"


def build(folder: Path) -> None:
    """The SD 1.5 architecture with seeded random weights: a diffusers folder and the same
    weights as one original-layout file (limner's name maps; diffusers' converters read them)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from limner.plugins.clip import BPE, _vocabulary
    from limner.plugins.sd_unet import unet_name
    from limner.plugins.stable_diffusion import CLIP_L, UNET, VAE, vae_name

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406))
    encoder, ranks = _vocabulary(str(BPE))
    (folder / "vocab.json").write_text(json.dumps(encoder))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in sorted(
        ranks, key=ranks.get)) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "diffusers")
    state = {UNET + unet_name(k, 2, [True, True, True, False]): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        state[VAE + vae_name(k, 4)] = v[:, :, None, None] if ".attentions." in k and v.ndim == 2 else v
    state.update({CLIP_L + (k if k.startswith("text_model.") else f"text_model.{k}"): v
                  for k, v in text.state_dict().items() if not k.endswith("position_ids")})
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "sd15.safetensors"))


def run_limner(folder: Path) -> dict:
    import torch

    import limner

    start = time.perf_counter()
    pipe = limner.load_pipeline(folder / "sd15.safetensors", device="cpu")
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        pipe.generate([PROMPT], sampler="euler", schedule="karras", steps=STEPS, guidance=GUIDANCE, seed=0)
    return {"load_seconds": loaded, "sample_seconds": time.perf_counter() - start}


def run_diffusers(folder: Path) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers", torch_dtype=torch.float32)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(0), output_type="pt")
    return {"load_seconds": loaded, "sample_seconds": time.perf_counter() - start}


def side(name: str, folder: Path) -> dict:
    """One side in a fresh interpreter (-P: the repository root never shadows packages)."""
    here = str(Path(__file__).parent)
    code = (f"import json, resource, sys; sys.path.insert(0, {here!r}); import sd_full_size as b; "
            f"r = b.run_{name}(__import__('pathlib').Path({str(folder)!r})); "
            "r['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20; print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["seconds_per_step"] = result["sample_seconds"] / STEPS  # decode and text encoding included
    return {k: round(v, 3) for k, v in result.items()}


def main() -> None:
    import torch

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        build(folder)
        built = time.perf_counter() - start
        rows = {"limner (single file)": side("limner", folder), "diffusers (its folder)": side("diffusers", folder)}
        size = (folder / "sd15.safetensors").stat().st_size / 1e9
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"what": f"SD 1.5 architecture, random weights, float32, {SIZE}x{SIZE}, {STEPS} Euler steps, guidance "
                      f"{GUIDANCE}, batch 1", "file_gb": round(size, 2), "build_seconds": round(built, 1),
              "cpu": cpu, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        from limner.files import write_text_atomic

        write_text_atomic(out, text + "\n")
        lines = ["# Stable Diffusion 1.5 at full size on the CPU (issue 26)", "",
                 f"{result['what']}; {cpu}, {result['threads']} threads, {result['date']}. One {size:.2f} GB "
                 "original-layout file for limner, the same weights as a diffusers folder for diffusers; each side "
                 "in its own process. `python benchmarks/sd_full_size.py benchmarks/results/sd15-full-size.json`. "
                 "Seconds per step include the text encoding and the VAE decode divided over the steps.", "",
                 "| | load s | sample s | s/step | peak RSS GB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['load_seconds']} | {r['sample_seconds']} | {r['seconds_per_step']} | "
                  f"{r['peak_rss_gb']} |" for name, r in rows.items()]
        write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
