"""SDXL from a diffusers folder against diffusers on the same tiny random pipeline (built as
diffusers' own SDXL tests build theirs: two CLIP text encoders, the second with a projection, a
UNet with text_time added conditions and transformers of depth 1 and 2): what is detected, both
encoders' embeddings and the pooled one, the UNet with its added conditions, and a whole 8-step
Euler image from the same initial latent."""
import pytest
import torch
from test_stable_diffusion import clip_tokenizer

import limner
from limner.sampling import sample

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_sdxl(folder):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025)
    config = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                  hidden_act="gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=1, projection_dim=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    (folder / "t1").mkdir()
    (folder / "t2").mkdir()
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                               tokenizer=clip_tokenizer(folder / "t1", sd2=False),
                                               tokenizer_2=clip_tokenizer(folder / "t2", sd2=True), unet=unet,
                                               scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder / "sdxl")
    return pipe.to(torch.float32), folder / "sdxl"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    anchor, folder = tiny_sdxl(tmp_path_factory.mktemp("sdxl"))
    return anchor, folder, limner.load_pipeline(folder, device="cpu")


def test_the_folder_is_read_as_sdxl(sdxl):
    _, folder, pipe = sdxl
    assert pipe.found.family == "sdxl" and set(pipe.found.facts["parts"]) == {"text_encoder", "text_encoder_2",
                                                                               "unet", "vae"}
    assert pipe.model.cfg.image_size == 32 and pipe.model.autoencoder.scale == 0.13025


def test_both_encoders_and_the_pooled_embedding_equal_diffusers(sdxl):
    anchor, _, pipe = sdxl
    prompt = "a red circle at the top left"
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = anchor.encode_prompt(prompt, device="cpu")
    got = pipe.model.encode([prompt])
    torch.testing.assert_close(got.tokens, embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pooled, pooled, atol=1e-4, rtol=1e-4)
    empty = pipe.model.encode([""])  # force_zeros_for_empty_prompt: the unconditional branch is zeros
    assert not empty.tokens.any() and not empty.pooled.any() and not negative.any() and not negative_pooled.any()


def test_the_unet_with_its_added_conditions_equals_diffusers(sdxl):
    anchor, _, pipe = sdxl
    gen = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 64, generator=gen), \
        torch.randn(2, 32, generator=gen)
    t, ids = torch.tensor([20.0, 600.0]), torch.tensor([[40.0, 48.0, 2.0, 0.0, 32.0, 32.0]] * 2)
    with torch.no_grad():
        want = anchor.unet(x, t, encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = pipe.model.denoiser.net.unet(x, t, context, added=(pooled, ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_euler_image_equals_diffusers_from_the_same_latent(sdxl):
    anchor, _, pipe = sdxl
    prompt = "a blue square at the center"
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = anchor(prompt, num_inference_steps=8, guidance_scale=4.0, latents=latents.clone(),
                      output_type="pt").images
        anchor.scheduler.set_timesteps(8)
        sigmas = anchor.scheduler.sigmas.double()
        x = sample(pipe.model, latents * anchor.scheduler.init_noise_sigma / sigmas[0], sampler="euler",
                   sigmas=sigmas, guidance=4.0, cond=pipe.model.encode([prompt]), uncond=pipe.model.encode([""]))
        got = (pipe.model.to_image(x).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


# --- one file in the original (SGM) layout ------------------------------------------------------

def original_sdxl(anchor) -> dict[str, torch.Tensor]:
    """The pipeline's weights under SDXL's original names (conditioner.embedders.0/1, label_emb),
    by limner's name maps."""
    from limner.plugins.sd_unet import unet_name
    from limner.plugins.stable_diffusion import UNET, VAE, XL_G, XL_L, open_clip_name, vae_name

    out = {UNET + unet_name(k, 2, [False, True]): v for k, v in anchor.unet.state_dict().items()}
    for k, v in anchor.vae.state_dict().items():
        out[VAE + vae_name(k, 2)] = v[:, :, None, None] if ".attentions." in k and v.ndim == 2 else v
    for k, v in anchor.text_encoder.state_dict().items():
        if not k.endswith("position_ids"):
            out[XL_L + (k if k.startswith("text_model.") else f"text_model.{k}")] = v
    fused = {}
    for k, v in anchor.text_encoder_2.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if k == "text_projection.weight":
            out[XL_G + "text_projection"] = v.T
            continue
        name, third = open_clip_name(k if k.startswith("text_model.") else f"text_model.{k}")
        if third is None:
            out[XL_G + name] = v
        else:
            fused.setdefault(XL_G + name, [None] * 3)[third] = v
    out.update({k: torch.cat(v) for k, v in fused.items()})
    return {k: v.contiguous() for k, v in out.items()}


def test_a_single_file_is_read_as_sdxl_and_draws_what_diffusers_draws(tmp_path):
    """A tiny SDXL whose heads are 64 wide and whose size sinusoids are 256 wide, as SDXL's own
    (a single file records neither), written in the original layout: detected as SDXL, both
    embeddings and a whole 8-step image equal the diffusers pipeline's."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=1600,
        cross_attention_dim=128)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, scaling_factor=0.13025,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    config = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
                  eos_token_id=49407, bos_token_id=49406, pad_token_id=1, projection_dim=64)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config, hidden_act="quick_gelu"))
    text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config, hidden_act="gelu"))
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    anchor = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=clip_tokenizer(tmp_path / "t1", sd2=False),
        tokenizer_2=clip_tokenizer(tmp_path / "t2", sd2=True), unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   timestep_spacing="leading", steps_offset=1))
    from diffusers.loaders import single_file_utils as convert

    state = original_sdxl(anchor)  # the names are SDXL's own: diffusers' converter reads them back
    read = convert.convert_ldm_unet_checkpoint(dict(state), anchor.unet.config)
    assert set(read) == set(anchor.unet.state_dict())
    assert all(torch.equal(read[k], v) for k, v in anchor.unet.state_dict().items())
    read = convert.convert_open_clip_checkpoint(anchor.text_encoder_2, dict(state),
                                                prefix="conditioner.embedders.1.model.")
    own = anchor.text_encoder_2.state_dict()
    assert all(torch.equal(read.get(k, read.get(f"text_model.{k}")), v) for k, v in own.items()
               if not k.endswith("position_ids"))
    file = tmp_path / "sdxl.safetensors"
    save_file(state, str(file))
    pipe = limner.load_pipeline(file, device="cpu")
    assert (pipe.found.family, pipe.found.form) == ("sdxl", "single file")
    assert set(pipe.found.facts["parts"]) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    prompt = "a green triangle at the right"
    with torch.no_grad():
        embeds, _, pooled, _ = anchor.encode_prompt(prompt, device="cpu")
    got = pipe.model.encode([prompt])
    torch.testing.assert_close(got.tokens, embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pooled, pooled, atol=1e-4, rtol=1e-4)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = anchor(prompt, num_inference_steps=8, guidance_scale=4.0, latents=latents.clone(), height=32, width=32,
                      output_type="pt").images
        anchor.scheduler.set_timesteps(8)
        sigmas = anchor.scheduler.sigmas.double()
        x = sample(pipe.model, latents * anchor.scheduler.init_noise_sigma / sigmas[0], sampler="euler",
                   sigmas=sigmas, guidance=4.0, cond=pipe.model.encode([prompt]), uncond=pipe.model.encode([""]))
        got_image = (pipe.model.to_image(x).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(got_image, want, atol=1e-3, rtol=1e-3)


def test_the_full_size_sdxl_file_is_read_for_what_it_is_from_keys_and_shapes():
    """SDXL base at full size, built on the meta device (no memory) and named as its original
    file names it: the options limner reads off the keys and shapes are SDXL's own."""
    from pathlib import Path

    from limner.plugins import stable_diffusion as sd
    from limner.plugins.sd_unet import unet_name

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, use_linear_projection=True, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
    shapes = {sd.UNET + unet_name(k, 2, [False, True, True]): tuple(v.shape) for k, v in unet.state_dict().items()}
    shapes.update({sd.VAE + sd.vae_name(k, 4): tuple(v.shape) for k, v in vae.state_dict().items()})
    shapes.update({f"{sd.XL_L}text_model.encoder.layers.{i}.layer_norm1.weight": (768,) for i in range(12)})
    shapes[sd.XL_L + "text_model.embeddings.token_embedding.weight"] = (49408, 768)
    shapes.update({f"{sd.XL_G}transformer.resblocks.{i}.ln_1.weight": (1280,) for i in range(32)})
    shapes.update({sd.XL_G + "token_embedding.weight": (49408, 1280), sd.XL_G + "text_projection": (1280, 1280)})

    class Header(sd.SingleFile):
        def __init__(self):
            self.shapes, self.path, self.metadata = shapes, Path("sdxl.safetensors"), {}

    family, options = sd._file_config(Header())
    assert family == "sdxl" and options["context"] == 2048 and sd._what_file(Header()) is None
    u = options["denoiser"]
    assert (u["channels"], u["blocks"], u["attention"], u["depth"], u["head_dim"], u["pooled_dim"]) == (
        [320, 640, 1280], 2, [False, True, True], [1, 2, 10], 64, 1280)
    first, second = options["text_encoder"]["first"], options["text_encoder"]["second"]
    assert (first["width"], first["layers"], first["skip"], first["norm_skip"]) == (768, 12, 1, False)
    assert (second["width"], second["layers"], second["heads"], second["projection"], second["pad"]) == (
        1280, 32, 20, 1280, "!")
    assert options["autoencoder"]["scale"] == 0.13025
    with torch.device("meta"):
        built = limner.create("denoisers", "sd_unet", context_dim=2048, in_channels=4, image_size=128,
                              **{k: v for k, v in u.items() if k != "name"})
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in unet.parameters())  # 2.57B


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_an_sdxl_lora_applied_by_limner_equals_diffusers(sdxl, layout, tmp_path):
    """LoRAs for SDXL: kohya's (the UNet's layers under their original names, input_blocks_4_1_...,
    and lora_te1_/lora_te2_ for the two encoders) and diffusers' (unet., text_encoder.,
    text_encoder_2.), applied merged and kept beside the weights, against diffusers'
    load_lora_weights on the same pipeline."""
    from safetensors.torch import save_file

    from limner.plugins.sd_unet import unet_name

    anchor, folder, _ = sdxl
    gen, state = torch.Generator().manual_seed(7), {}
    for part, module in (("unet", anchor.unet), ("text_encoder", anchor.text_encoder),
                         ("text_encoder_2", anchor.text_encoder_2)):
        for name, layer in module.named_modules():
            if not (isinstance(layer, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj",
                                                                          "v_proj", "out_proj", "fc1", "ff.net.2"))):
                continue
            down = torch.randn(4, layer.in_features, generator=gen) * 0.2
            up = torch.randn(layer.out_features, 4, generator=gen) * 0.2
            if part != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"
            if layout == "peft":
                state.update({f"{part}.{name}.lora_A.weight": down, f"{part}.{name}.lora_B.weight": up})
                continue
            if part == "unet":
                key = "lora_unet_" + unet_name(name + ".weight", 2, [False, True]).removesuffix(".weight")
            else:
                key = ("lora_te1_" if part == "text_encoder" else "lora_te2_") + name
            key = key.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(2.0)})
    path = tmp_path / "xl.safetensors"
    save_file(state, str(path))
    prompt = "a red circle at the top left"
    gen = torch.Generator().manual_seed(8)
    x, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([300.0])
    ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    anchor.load_lora_weights(dict(state), adapter_name="xl")
    try:
        with torch.no_grad():
            embeds, _, pooled, _ = anchor.encode_prompt(prompt, device="cpu")
            want = anchor.unet(x, t, encoder_hidden_states=embeds,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    finally:
        anchor.unload_lora_weights()
    for merge in (True, False):
        pipe = limner.load_pipeline(folder, device="cpu")
        pipe.load_lora(path, merge=merge)
        with torch.no_grad():
            got = pipe.model.encode([prompt])
            out = pipe.model.denoiser.net.unet(x, t, got.tokens, added=(got.pooled, ids))
        torch.testing.assert_close(got.tokens, embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.pooled, pooled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
