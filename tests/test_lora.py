"""LoRA files applied by limner against diffusers' load_lora_weights (PEFT backend) on the same
tiny random Stable Diffusion pipeline: random LoRAs in the kohya/A1111 layout (with alphas, a
3x3 convolution's LoCon pair included) and the diffusers/PEFT layout, on the UNet and the text
encoder; merged and kept beside the weights; at strength 1 and 0.5; and the files limner
cannot apply, each named."""
import pytest
import torch
from safetensors.torch import save_file
from test_stable_diffusion import file_pipeline, original_layout

import limner
from limner.lora import parse_spec

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    anchor = file_pipeline(folder, sd2=False)
    save_file(original_layout(anchor, sd2=False), str(folder / "model.safetensors"))
    return anchor, folder


def random_lora(anchor, layout: str, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA on every attention, projection and feed-forward layer of the UNet and the text
    encoder (and, in the kohya layout, one 3x3 ResNet convolution), random up and down."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for part, module, names in (("unet", anchor.unet, UNET_TARGETS), ("text_encoder", anchor.text_encoder,
                                                                        TEXT_TARGETS)):
        for name, layer in module.named_modules():
            conv = layout == "kohya" and part == "unet" and name == "down_blocks.0.resnets.0.conv1"
            if not (name.endswith(names) or conv):
                continue
            if isinstance(layer, torch.nn.Conv2d):
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * 0.2
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * 0.2
            else:
                down = torch.randn(rank, layer.in_features, generator=gen) * 0.2
                up = torch.randn(layer.out_features, rank, generator=gen) * 0.2
            if part == "text_encoder" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # the files' names (transformers 5 dropped the level from its model)
            if layout == "kohya":
                key = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
                out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(float(rank) / 2)})
            else:
                out.update({f"{part}.{name}.lora_A.weight": down, f"{part}.{name}.lora_B.weight": up})
    return out


def outputs(unet, encode, prompt: str = "a red circle at the top left"):
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([50.0, 700.0])
    with torch.no_grad():
        context = encode(prompt)
        return context, unet(x, t, context.expand(2, -1, -1))


def anchor_outputs(anchor, state, strength: float):
    anchor.load_lora_weights(dict(state), adapter_name="lora")
    anchor.set_adapters(["lora"], adapter_weights=[strength])
    try:
        return outputs(lambda x, t, c: anchor.unet(x, t, encoder_hidden_states=c).sample,
                       lambda p: anchor.encode_prompt([p], "cpu", 1, False)[0])
    finally:
        anchor.unload_lora_weights()


def limner_outputs(pipe):
    return outputs(pipe.model.denoiser.net.unet, lambda p: pipe.model.encode([p]).tokens)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_a_lora_applied_by_limner_equals_diffusers(sd, layout, tmp_path):
    anchor, folder = sd
    state = random_lora(anchor, layout)
    path = tmp_path / f"{layout}.safetensors"
    save_file(state, str(path))
    plain = limner_outputs(limner.load_pipeline(folder / "model.safetensors", device="cpu"))
    for strength in (1.0, 0.5):
        want = anchor_outputs(anchor, state, strength)
        merged = limner.load_pipeline(folder / "model.safetensors", device="cpu", lora=[f"{path}:{strength}"])
        pipe = limner.load_pipeline(folder / "model.safetensors", device="cpu")
        applied = pipe.load_lora(path, strength=0.3 if strength == 0.5 else strength, merge=False)
        if strength == 0.5:  # kept beside the weights: a new strength without reloading
            limner_outputs(pipe)  # embeddings of the old strength cached ...
            applied.set_strength(0.5)  # ... and forgotten with it
        for got in (limner_outputs(merged), limner_outputs(pipe)):
            torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
        assert (want[1] - plain[1]).abs().max() > 1e-2 and (want[0] - plain[0]).abs().max() > 1e-2
        applied.remove()
        torch.testing.assert_close(limner_outputs(pipe)[1], plain[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(limner_outputs(pipe)[0], plain[0], atol=1e-5, rtol=1e-5)


def test_files_limner_cannot_apply_are_named(sd, tmp_path):
    anchor, folder = sd
    pipe = limner.load_pipeline(folder / "model.safetensors", device="cpu")
    good = random_lora(anchor, "kohya")
    key = next(k for k in good if k.endswith("attn1_to_q.lora_down.weight"))
    up = key.replace(".lora_down.", ".lora_up.")
    cases = {
        "nomatch": ({**good, key.replace("attn1_to_q", "attn9_to_q"): good[key].clone(),
                     up.replace("attn1_to_q", "attn9_to_q"): good[up].clone()},
                    r"1 of its unet keys match no layer of this model \(down_blocks_0_attentions_0_transformer_"
                    r"blocks_0_attn9_to_q\): a LoRA for another model or family"),
        "rank": ({**good, up: torch.zeros(good[up].shape[0], 3)},
                 r"is 64 -> 64, but the LoRA's down is \(4, 64\) and up \(64, 3\): a LoRA for another model size"),
        "bigger": ({key: torch.zeros(4, 320), up: torch.zeros(320, 4)},
                   r"is 64 -> 64, but the LoRA's down is \(4, 320\)"),
        "sdxl": ({**good, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 64),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(256, 1)},
                 r"has text_encoder_2 layers, which this model does not expose to LoRA \(it has: text_encoder, unet\)"),
        "sd3": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 1)},
                r"is a LoRA for a transformer model \(SD 3, Flux\)"),
        "half": ({key: good[key]}, r"is not a kohya LoRA pair"),
        "flat": ({key: good[key], up: torch.zeros(64)}, r"but the LoRA's down is \(4, 64\) and up \(64,\)"),
        "rank0": ({key: torch.zeros(0, 64), up: torch.zeros(64, 0)}, r"but the LoRA's down is \(0, 64\)"),
        "dora": ({**good, key.replace(".lora_down.weight", ".dora_scale"): torch.ones(1, 64)},
                 r"dora_scale' is not a plain LoRA's"),
        "model": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, r"is not a LoRA limner reads"),
    }
    for name, (tensors, match) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        before = {k: v.clone() for k, v in pipe.model.state_dict().items() if "to_q" in k}
        with pytest.raises(limner.LimnerError, match=match):
            pipe.load_lora(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(v, pipe.model.state_dict()[k]) for k, v in before.items())  # nothing half-applied


def test_lora_specs_and_the_command_line(sd, tmp_path, capsys):
    from test_cli import run

    anchor, folder = sd
    assert parse_spec("a/b.safetensors:0.75") == ("a/b.safetensors", 0.75)
    assert parse_spec("b.safetensors") == ("b.safetensors", 1.0)
    with pytest.raises(limner.LimnerError, match="must be a number"):
        parse_spec("b.safetensors:strong")
    path = tmp_path / "style.safetensors"
    state = random_lora(anchor, "peft")
    save_file(state, str(path))
    args = ["sample", str(folder / "model.safetensors"), "-p", "a cat", "--steps", "2", "--out"]
    assert run(capsys, *args, str(tmp_path / "a"))[0] == 0
    assert run(capsys, *args, str(tmp_path / "b"), "--lora", f"{path}:0.8")[0] == 0
    import json

    record = json.loads((tmp_path / "b" / "prompts.jsonl").read_text().splitlines()[0])
    assert record["settings"]["lora"] == [f"{path}:0.8"]
    a, b = (next((tmp_path / d).glob("000-*.png")).read_bytes() for d in "ab")
    assert a != b
    code, _, err = run(capsys, *args, str(tmp_path / "c"), "--lora", str(tmp_path / "missing.safetensors"))
    assert code != 0 and "cannot read the LoRA file" in err and "Traceback" not in err
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "LoRA" and info["layout"] == "diffusers/PEFT", info
    for part in ("unet", "text_encoder"):
        layers = {k.split(".lora_")[0] for k in state if k.startswith(part + ".")}
        assert info["parts"][part]["layers"] == len(layers) and info["parts"][part]["rank"] == 4, info


def test_a_checkpoints_sample_table_merges_its_loras_from_inside_it(tmp_path):
    """[sample] lora = ["FILE:STRENGTH"] in a limner checkpoint's config: the file, inside the
    checkpoint folder, is merged in when the checkpoint loads; a file outside it is refused."""
    import shutil
    from pathlib import Path

    ckpt = tmp_path / "ckpt"
    shutil.copytree(Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-unet", ckpt)
    plain = limner.load_pipeline(ckpt, device="cpu")
    gen, state = torch.Generator().manual_seed(0), {}
    for name, layer in plain.model.denoiser.net.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(("to_q", "to_v")):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=gen) * 0.3
            state[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=gen) * 0.3
    assert state, "the demo UNet has attention layers to adapt"
    save_file(state, str(ckpt / "style.safetensors"))
    config = (ckpt / "config.toml").read_text()
    (ckpt / "config.toml").write_text(config.replace("[sample]\n", '[sample]\nlora = ["style.safetensors:0.5"]\n', 1))
    styled = limner.load_pipeline(ckpt, device="cpu")
    a = plain.generate("a red circle at the top left", steps=4, seed=0)
    b = styled.generate("a red circle at the top left", steps=4, seed=0)
    assert (a - b).abs().max() > 1e-3
    (ckpt / "config.toml").write_text(config.replace("[sample]\n", '[sample]\nlora = ["../style.safetensors"]\n', 1))
    with pytest.raises(limner.LimnerError, match=r"\[sample\] lora names '../style.safetensors', which is outside"):
        limner.load_pipeline(ckpt, device="cpu")
