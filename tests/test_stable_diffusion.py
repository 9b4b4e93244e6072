"""Stable Diffusion from a diffusers folder, against diffusers on the same tiny random pipeline
(built as diffusers' own tests build theirs, saved with save_pretrained; no download): what is
detected, the text embeddings, and a whole 8-step Euler image from the same initial latent."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import limner
from limner.plugins.clip import BPE, _vocabulary
from limner.sampling import sample

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def clip_tokenizer(folder, sd2: bool):
    """transformers' CLIPTokenizer over limner's shipped vocabulary (SD 2 pads with "!")."""
    encoder, ranks = _vocabulary(str(BPE))
    (folder / "vocab.json").write_text(json.dumps(encoder))
    pairs = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in pairs) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      pad_token="!" if sd2 else "<|endoftext|>", model_max_length=77)


def assemble(folder, sd2: bool, unet, width: int, layers: int, heads: int, prediction: str = "epsilon"):
    """A StableDiffusionPipeline (its inpainting one for a 9-channel UNet) around `unet`: diffusers'
    tiny test VAE, a tiny CLIP text model (`width`, `layers`, `heads`; SD 2's gelu or SD 1's
    quick_gelu) and SD's Euler scheduler."""
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, hidden_act="gelu" if sd2 else "quick_gelu", eos_token_id=49407,
        bos_token_id=49406, pad_token_id=1))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1,
                                                 prediction_type=prediction)
    kind = diffusers.StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else \
        diffusers.StableDiffusionPipeline
    return kind(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(folder, sd2), scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_pipeline(folder, linear: bool = False, prediction: str = "epsilon"):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=linear)
    pipe = assemble(folder, linear, unet, width=32, layers=5, heads=4, prediction=prediction)
    pipe.save_pretrained(folder / "sd")
    return pipe.to(torch.float32), folder / "sd"


@pytest.fixture(scope="module", params=[(False, "epsilon"), (True, "v_prediction")], ids=["sd1", "sd2-v"])
def pipelines(request, tmp_path_factory):
    anchor, folder = tiny_pipeline(tmp_path_factory.mktemp("sd"), *request.param)
    return anchor, folder, limner.load_pipeline(folder, device="cpu")


def test_the_folder_is_detected_as_what_it_is(pipelines):
    anchor, folder, pipe = pipelines
    linear = anchor.unet.config.use_linear_projection
    assert pipe.found.family == ("sd2" if linear else "sd1") and pipe.found.form == "diffusers folder"
    assert pipe.found.facts["prediction"] == anchor.scheduler.config.prediction_type
    assert pipe.model.autoencoder is not None and pipe.model.latent == (4, 16, 16)


def test_text_embeddings_equal_diffusers(pipelines):
    anchor, _, pipe = pipelines
    prompts = ["a photo of an astronaut riding a horse!!", ""]
    with torch.no_grad():
        want, _ = anchor.encode_prompt(prompts, "cpu", 1, False)
        got = pipe.model.encode(prompts)
    torch.testing.assert_close(got.tokens, want, atol=1e-4, rtol=1e-4)


def test_an_euler_image_equals_diffusers_from_the_same_latent(pipelines):
    anchor, _, pipe = pipelines
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prompt, steps, guidance = "a red circle at the top left", 8, 3.0
    with torch.no_grad():
        want = anchor(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                      output_type="pt").images
        anchor.scheduler.set_timesteps(steps)
        sigmas = anchor.scheduler.sigmas.double()
        start = latents * anchor.scheduler.init_noise_sigma / sigmas[0]  # limner's x_T = noise * sigma_max
        x = sample(pipe.model, start, sampler="euler", sigmas=sigmas, guidance=guidance,
                   cond=pipe.model.encode([prompt]), uncond=pipe.model.encode([""]))
        got = (pipe.model.to_image(x).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_limner_sample_draws_from_the_folder(pipelines, tmp_path):
    _, folder, pipe = pipelines
    images = pipe.generate(["a cat", "a dog"], steps=3, seed=[0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # per-image seeds hold: the same image alone or in a batch (to float rounding of batched kernels)
    torch.testing.assert_close(images[1], pipe.generate(["a dog"], steps=3, seed=1)[0], atol=1e-4, rtol=1e-4)


def test_unsupported_folders_are_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(limner.LimnerError, match="Stable Diffusion 3 is not supported yet"):
        limner.load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(limner.LimnerError, match="no checkpoint found at .*a model file or folder of a family limner "
                                                 "reads .stable_diffusion"):
        limner.load_pipeline(tmp_path)


def test_limner_inspect_names_the_folder_and_its_parts(pipelines, capsys):
    from test_cli import run

    anchor, folder, _ = pipelines
    code, out, _ = run(capsys, "inspect", str(folder), "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "diffusers folder" and info["reader"] == "stable_diffusion"
    assert info["parts"]["unet"]["parameters"] == sum(p.numel() for p in anchor.unet.parameters())
    code, _, err = run(capsys, "inspect", str(folder / "unet"))
    assert code == 1 and "neither a limner checkpoint nor a model file or folder of a family" in err


# --- one file in the original layout ------------------------------------------------------------

def file_pipeline(folder, sd2: bool, in_channels: int = 4):
    """A tiny pipeline whose heads are as Stable Diffusion's own rule gives them (8 heads for SD 1,
    64-wide heads for SD 2 and for CLIP), which a single file does not record."""
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2)
    return assemble(folder, sd2, unet, width=64, layers=3, heads=1)


def original_layout(anchor, sd2: bool) -> dict:
    """The pipeline's weights under their original (CompVis/Stability) names, by limner's name maps."""
    from limner.plugins.sd_unet import unet_name
    from limner.plugins.stable_diffusion import CLIP_L, OPEN_CLIP, UNET, VAE, open_clip_name, vae_name

    out = {UNET + unet_name(k, 1, [True, False]): v for k, v in anchor.unet.state_dict().items()}
    for k, v in anchor.vae.state_dict().items():
        out[VAE + vae_name(k, 2)] = v[:, :, None, None] if ".attentions." in k and v.ndim == 2 else v
    text = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in
            anchor.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if not sd2:
        out.update({CLIP_L + k: v for k, v in text.items()})
        return {k: v.contiguous() for k, v in out.items()}
    fused = {}
    for k, v in text.items():
        name, third = open_clip_name(k)
        if third is None:
            out[OPEN_CLIP + name] = v
        else:
            fused.setdefault(OPEN_CLIP + name, [None] * 3)[third] = v
    out.update({k: torch.cat(v) for k, v in fused.items()})
    width, gen = 64, torch.Generator().manual_seed(5)  # OpenCLIP's last block, which SD 2 does not read
    for name, shape in (("attn.in_proj_weight", (3 * width, width)), ("attn.in_proj_bias", (3 * width,)),
                        ("attn.out_proj.weight", (width, width)), ("attn.out_proj.bias", (width,)),
                        ("ln_1.weight", (width,)), ("ln_1.bias", (width,)), ("ln_2.weight", (width,)),
                        ("ln_2.bias", (width,)), ("mlp.c_fc.weight", (4 * width, width)),
                        ("mlp.c_fc.bias", (4 * width,)), ("mlp.c_proj.weight", (width, 4 * width)),
                        ("mlp.c_proj.bias", (width,))):
        out[f"{OPEN_CLIP}transformer.resblocks.3.{name}"] = torch.randn(shape, generator=gen)
    out[OPEN_CLIP + "text_projection"] = torch.randn(width, width, generator=gen)
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module", params=[False, True], ids=["sd1-file", "sd2-file"])
def single_files(request, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("file")
    anchor = file_pipeline(folder, request.param)
    state = original_layout(anchor, request.param)
    save_file(state, str(folder / "model.safetensors"), metadata={"modelspec.architecture": "stable-diffusion"})
    return anchor, state, folder / "model.safetensors", request.param


def test_limners_original_names_are_the_ones_diffusers_reads(single_files):
    """diffusers' own single-file converters map the file limner's name maps wrote back to the
    pipeline's parameters: the names are the original layout's, not an invention of limner's."""
    from diffusers.loaders import single_file_utils as convert

    anchor, state, _, sd2 = single_files
    unet = convert.convert_ldm_unet_checkpoint(dict(state), anchor.unet.config)
    assert set(unet) == set(anchor.unet.state_dict())
    assert all(torch.equal(unet[k], v) for k, v in anchor.unet.state_dict().items())
    vae = convert.convert_ldm_vae_checkpoint(dict(state), anchor.vae.config)
    assert all(torch.equal(vae[k].reshape(v.shape), v) for k, v in anchor.vae.state_dict().items())
    text = convert.convert_open_clip_checkpoint(anchor.text_encoder, dict(state)) if sd2 else \
        convert.convert_ldm_clip_checkpoint(dict(state))
    own = {k.removeprefix("text_model."): v for k, v in anchor.text_encoder.state_dict().items()}
    assert all(torch.equal(text.get(k, text.get(f"text_model.{k}")), v) for k, v in own.items()
               if not k.endswith("position_ids"))


def test_a_single_file_loads_and_draws_what_diffusers_draws(single_files, capsys):
    from test_cli import run

    anchor, _, file, sd2 = single_files
    pipe = limner.load_pipeline(file, device="cpu")
    assert (pipe.found.family, pipe.found.form) == ("sd2" if sd2 else "sd1", "single file")
    prompt = "a red circle at the top left"
    with torch.no_grad():
        want_text, _ = anchor.encode_prompt([prompt], "cpu", 1, False)
    torch.testing.assert_close(pipe.model.encode([prompt]).tokens, want_text, atol=1e-4, rtol=1e-4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = anchor(prompt, num_inference_steps=6, guidance_scale=4.0, latents=latents.clone(),
                      output_type="pt").images
        anchor.scheduler.set_timesteps(6)
        sigmas = anchor.scheduler.sigmas.double()
        x = sample(pipe.model, latents * anchor.scheduler.init_noise_sigma / sigmas[0], sampler="euler",
                   sigmas=sigmas, guidance=4.0, cond=pipe.model.encode([prompt]), uncond=pipe.model.encode([""]))
        got = (pipe.model.to_image(x).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    code, out, _ = run(capsys, "inspect", str(file), "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "single file" and info["prediction"] == "epsilon"
    assert info["parts"]["unet"]["parameters"] == sum(p.numel() for p in anchor.unet.parameters())


def test_files_limner_cannot_run_are_named(tmp_path, single_files):
    from safetensors.torch import save_file

    _, state, _, _ = single_files
    cases = {
        "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)},
                             "is a LoRA"),
        "vae.safetensors": ({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, "is a bare VAE"),
        "sd3.safetensors": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)},
                            "is a Stable Diffusion 3 checkpoint"),
        "unet.safetensors": ({k: v for k, v in state.items() if k.startswith("model.")}, "a UNet without its VAE"),
    }
    for name, (tensors, what) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(limner.LimnerError, match=what):
            limner.load_pipeline(tmp_path / name)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(limner.LimnerError, match="no checkpoint found at .*other.safetensors: expected a limner "
                                                 "checkpoint .* or a model file or folder of a family limner reads"):
        limner.load_pipeline(tmp_path / "other.safetensors")
    key = next(k for k in state if k.startswith("model.") and k.endswith("weight"))
    save_file({**state, key: state[key].to(torch.float8_e4m3fn)}, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(limner.LimnerError, match=f"tensor '{key}' is stored as F8_E4M3, which limner does not read "
                                                 r"\(it reads F64, F32, F16, BF16"):
        limner.load_pipeline(tmp_path / "fp8.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"not read")
    with pytest.raises(limner.LimnerError, match="is a pickled checkpoint: limner never unpickles"):
        limner.load_pipeline(tmp_path / "old.ckpt")


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1.5", "sd2.1"])
def test_full_size_files_are_read_for_what_they_are_from_keys_and_shapes(sd2):
    """The real architectures at full size, built on the meta device (no memory), named as the
    original files name them: the options limner reads off the keys and shapes are SD's own."""
    from limner.plugins import stable_diffusion as sd
    from limner.plugins.sd_unet import unet_name

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=1024 if sd2 else 768, use_linear_projection=sd2,
                                              attention_head_dim=(5, 10, 20, 20) if sd2 else 8)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
    shapes = {sd.UNET + unet_name(k, 2, [True, True, True, False]): tuple(v.shape)
              for k, v in unet.state_dict().items()}
    shapes.update({sd.VAE + sd.vae_name(k, 4): tuple(v.shape) for k, v in vae.state_dict().items()})
    if sd2:
        shapes.update({f"{sd.OPEN_CLIP}transformer.resblocks.{i}.ln_1.weight": (1024,) for i in range(24)})
        shapes[sd.OPEN_CLIP + "token_embedding.weight"] = (49408, 1024)
    else:
        shapes.update({f"{sd.CLIP_L}text_model.encoder.layers.{i}.layer_norm1.weight": (768,) for i in range(12)})
        shapes[sd.CLIP_L + "text_model.embeddings.token_embedding.weight"] = (49408, 768)

    class Header(sd.SingleFile):
        def __init__(self):
            self.shapes, self.path, self.metadata = shapes, Path("full.safetensors"), {}

    family, options = sd._file_config(Header())
    assert family == ("sd2" if sd2 else "sd1") and options["context"] == (1024 if sd2 else 768)
    u = options["denoiser"]
    assert (u["channels"], u["blocks"], u["attention"], u["linear_projection"]) == (
        [320, 640, 1280, 1280], 2, [True, True, True, False], sd2)
    assert u.get("head_dim") == 64 if sd2 else u["heads"] == [8] * 4
    assert options["autoencoder"]["widths"] == [128, 256, 512, 512] and options["autoencoder"]["blocks"] == 2
    t = options["text_encoder"]
    assert (t["width"], t["layers"], t["heads"], t["act"], t["pad"]) == (
        (1024, 23, 16, "gelu", "!") if sd2 else (768, 12, 12, "quick_gelu", "end"))
    assert sd._what_file(Header()) is None


def test_a_dpmpp_2m_image_equals_diffusers_dpm_solver_from_the_same_latent(pipelines):
    """DPM-Solver++(2M) (Lu et al. 2022): limner's dpmpp_2m over the sigmas of diffusers'
    DPMSolverMultistepScheduler equals that scheduler's loop (first order at the last step, as both do)."""
    anchor, _, pipe = pipelines
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(anchor.scheduler.config, algorithm_type="dpmsolver++",
                                                                  solver_order=2, final_sigmas_type="zero")
    anchor = diffusers.StableDiffusionPipeline(**{**anchor.components, "scheduler": scheduler})
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    prompt, steps, guidance = "a blue square at the center", 8, 3.0
    with torch.no_grad():
        want = anchor(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                      output_type="pt").images
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.double()
        # DPM-Solver's state is the variance-preserving x (unit variance at the start); limner's the
        # variance-exploding x / alpha = x * sqrt(1 + sigma^2)
        start = latents * (1 + sigmas[0] ** 2).sqrt() / sigmas[0]
        x = sample(pipe.model, start.float(), sampler="dpmpp_2m", sigmas=sigmas,
                   guidance=guidance, cond=pipe.model.encode([prompt]), uncond=pipe.model.encode([""]))
        got = (pipe.model.to_image(x).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_prediction_given_on_the_command_line_overrides_a_file_that_says_nothing(single_files, tmp_path, capsys):
    from test_cli import run

    _, _, file, _ = single_files
    assert limner.load_pipeline(file).model.denoiser.parameterization == "eps"  # no metadata: epsilon assumed
    assert limner.load_pipeline(file, prediction="v").model.denoiser.parameterization == "v"
    code, _, _ = run(capsys, "sample", str(file), "-p", "a cat", "--steps", "2", "--prediction", "v",
                     "--out", str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "prompts.jsonl").read_text().splitlines()[0])
    assert code == 0 and record["settings"]["prediction"] == "v"
    code, _, err = run(capsys, "sample", str(file), "-p", "a cat", "--prediction", "x0")
    assert code != 0 and "x0" in err
    with pytest.raises(limner.LimnerError, match="--prediction is for model files of other tools"):
        limner.load_pipeline(Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-unet", prediction="v")


def test_the_files_tensors_become_the_parameters_never_a_second_copy(single_files, monkeypatch):
    """The model is built on the meta device and takes the tensors the family read as its own:
    a full-size file is never held twice (random weights plus the file's)."""
    from limner.plugins.stable_diffusion import StableDiffusion

    _, _, file, _ = single_files
    read = {}
    original = StableDiffusion.load

    def load(self, path, **options):
        config, tensors = original(self, path, **options)
        read.update(tensors)
        return config, tensors

    monkeypatch.setattr(StableDiffusion, "load", load)
    pipe = limner.load_pipeline(file, device="cpu")
    own = dict(pipe.model.named_parameters())
    # (the denoiser's and the VAE decoder's convolution weights are then laid out channels-last, one
    # tensor at a time)
    relaid = {k for k in own if k.startswith(("denoiser.", "autoencoder.decoder.")) and own[k].ndim == 4}
    assert relaid and all(own[k].is_contiguous(memory_format=torch.channels_last) for k in relaid)
    bad = [k for k in own if k not in relaid and own[k].data_ptr() != read[k].data_ptr()]
    assert own and not bad, bad[:5]
    # read, not memory-mapped: no page of the file stays mapped (and counted) beside the model
    assert str(file.resolve()) not in Path("/proc/self/maps").read_text()


# --- inpainting models (a UNet of 9 input channels) ---------------------------------------------

@pytest.mark.parametrize("form", ["folder", "file"])
def test_an_inpainting_model_draws_what_diffusers_inpaint_pipeline_draws(form, tmp_path):
    """The 9-channel UNet reads the mask and the masked image's latents beside its latent, unscaled,
    as diffusers' StableDiffusionInpaintPipeline feeds it; limner's whole generate() (the mask at
    the latent's size, the masked image encoded, guidance batching them) against it, from the
    same initial latent. diffusers takes the masked image's latents ready-made (its posterior
    mean, computed here with its own VAE), so its VAE's sampling noise is out of the comparison."""
    from PIL import Image
    from safetensors.torch import save_file

    anchor = file_pipeline(tmp_path, sd2=False, in_channels=9)
    if form == "folder":
        anchor.save_pretrained(tmp_path / "sd")
        path = tmp_path / "sd"
    else:
        save_file(original_layout(anchor, sd2=False), str(tmp_path / "inpaint.safetensors"))
        path = tmp_path / "inpaint.safetensors"
    pipe = limner.load_pipeline(path, device="cpu")
    assert pipe.found.facts["task"] == "inpainting" and pipe.model.denoiser.concat == 5
    size = pipe.model.cfg.image_size  # a folder says 16 pixels (its UNet's sample_size); a file is taken as SD's
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:size * 3 // 4, size * 3 // 8:] = 255  # whole 2x2 cells of the VAE's grid: downsampled alike
    mask = Image.fromarray(mask)
    prompt = "a red circle at the top left"
    anchor.scheduler.set_timesteps(6)
    sigmas = anchor.scheduler.sigmas.double()
    noise, _ = pipe.noise(pipe.model.latent, 3, 1, 1)
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        keep = torch.from_numpy(np.asarray(mask) < 128)[None, None]
        masked = anchor.vae.encode(pixels * keep).latent_dist.mode() * anchor.vae.config.scaling_factor
        want = anchor(prompt, image=init, mask_image=mask, num_inference_steps=6, guidance_scale=4.0, strength=1.0,
                      latents=noise * sigmas[0] / anchor.scheduler.init_noise_sigma, masked_image_latents=masked,
                      height=size, width=size, output_type="pt").images
    got = pipe.generate(prompt, init_image=init, mask=mask, sampler="euler", sigmas=sigmas.tolist(), guidance=4.0,
                        seed=3)
    torch.testing.assert_close((got + 1) / 2, want, atol=1e-3, rtol=1e-3)
    # the mask matters: the same model given another mask draws another image
    other = pipe.generate(prompt, init_image=init, mask=Image.fromarray(255 - np.asarray(mask)), sampler="euler",
                          sigmas=sigmas.tolist(), guidance=4.0, seed=3)
    assert (other - got).abs().max() > 0.05


def test_an_inpainting_model_without_a_mask_draws_everything_and_other_unets_are_named(tmp_path):
    """No init image: the whole picture is drawn (mask 1, image 0, as A1111 feeds an inpainting
    model for text-to-image); a depth or instruct-pix2pix UNet is named for what it is."""
    from safetensors.torch import save_file

    anchor = file_pipeline(tmp_path, sd2=False, in_channels=9)
    state = original_layout(anchor, sd2=False)
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    pipe = limner.load_pipeline(tmp_path / "inpaint.safetensors", device="cpu")
    size = pipe.model.cfg.image_size
    with torch.no_grad():
        image = pipe.inpainting_channels(None, None, 2)
        blank = pipe.model.to_latent(torch.zeros(1, 3, size, size))
    assert image.shape == (2, 5, size // 2, size // 2) and bool((image[:, :1] == 1).all())
    torch.testing.assert_close(image[:, 1:], blank.expand(2, -1, -1, -1))
    a = pipe.generate("a blue square", steps=4, seed=1)
    assert a.shape == (1, 3, size, size) and bool(torch.isfinite(a).all())
    for channels, what in ((5, "a depth-conditioned model"), (8, "an instruct-pix2pix model"),
                           (7, "not a model limner knows")):
        conv = UNET_IN
        bad = dict(state)
        bad[conv] = torch.zeros(bad[conv].shape[0], channels, 3, 3)
        save_file(bad, str(tmp_path / f"c{channels}.safetensors"))
        with pytest.raises(limner.LimnerError, match=f"a UNet of {channels} input channels over 4-channel latents "
                                                     f"is {what}"):
            limner.load_pipeline(tmp_path / f"c{channels}.safetensors")


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def test_a_negative_prompt_steers_as_diffusers_does(pipelines):
    """Guidance away from a negative prompt instead of the empty one: generate() against the
    diffusers pipeline given the same negative prompt and initial latent."""
    anchor, _, pipe = pipelines
    anchor.scheduler.set_timesteps(6)
    sigmas = anchor.scheduler.sigmas.double()
    noise, _ = pipe.noise(pipe.model.latent, 2, 1, 1)
    prompt, negative = "a red circle at the top left", "a blue square"
    with torch.no_grad():
        want = anchor(prompt, negative_prompt=negative, num_inference_steps=6, guidance_scale=4.0,
                      latents=noise * sigmas[0] / anchor.scheduler.init_noise_sigma, output_type="pt").images
    got = pipe.generate(prompt, negative_prompt=negative, sampler="euler", sigmas=sigmas.tolist(), guidance=4.0,
                        seed=2)
    torch.testing.assert_close((got + 1) / 2, want, atol=1e-3, rtol=1e-3)
    plain = pipe.generate(prompt, sampler="euler", sigmas=sigmas.tolist(), guidance=4.0, seed=2)
    assert (plain - got).abs().max() > 0.01
    with pytest.raises(limner.LimnerError, match="a negative prompt works through guidance, which is off"):
        pipe.generate(prompt, negative_prompt=negative, guidance=1.0, steps=2)
    with pytest.raises(limner.LimnerError, match=r"negative_prompt must be one text or one per prompt \(2\)"):
        pipe.generate([prompt, prompt], negative_prompt=["x"], steps=2)


def test_a_latent_model_draws_at_other_sizes_and_a_pixel_model_says_it_cannot(pipelines):
    _, _, pipe = pipelines
    images = pipe.generate("a cat", steps=2, size=48)
    assert images.shape == (1, 3, 48, 48) and bool(torch.isfinite(images).all())
    with pytest.raises(limner.LimnerError, match="image size 47 must be a multiple of the autoencoder's factor 2"):
        pipe.generate("a cat", steps=2, size=47)
    pixel = limner.load_pipeline(Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-unet", device="cpu")
    with pytest.raises(limner.LimnerError, match="size 64: this model draws at the size it was trained at, 32"):
        pixel.generate("a red circle", steps=2, size=64)
