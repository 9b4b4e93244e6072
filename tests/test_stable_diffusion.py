"""Stable Diffusion from a diffusers folder, against diffusers on the same tiny random pipeline
(built as diffusers' own tests build theirs, saved with save_pretrained; no download): what is
detected, the text embeddings, and a whole 8-step Euler image from the same initial latent."""
import json

import pytest
import torch

import limner
from limner.plugins.clip import BPE, _vocabulary
from limner.sampling import sample

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_pipeline(folder, linear: bool = False, prediction: str = "epsilon"):
    encoder, ranks = _vocabulary(str(BPE))
    (folder / "vocab.json").write_text(json.dumps(encoder))
    pairs = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in pairs) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           pad_token="!" if linear else "<|endoftext|>", model_max_length=77)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=linear)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        hidden_act="gelu" if linear else "quick_gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=1))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1,
                                                 prediction_type=prediction)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
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
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(limner.LimnerError, match="SDXL .issue 29. is not supported yet"):
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
