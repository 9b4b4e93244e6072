"""The Stable Diffusion 1.x/2.x/SDXL family: recognises a diffusers folder (model_index.json naming a
StableDiffusionPipeline, with unet/, vae/, text_encoder/, tokenizer/ and scheduler/) and turns it
into a `diffusion` run config over limner's own networks (`clip_text_transformer`,
`autoencoder_kl`, `sd_unet`) and the state dict of that model. Whether it is SD 1 or SD 2 comes
from the UNet's transformers (SD 2 projects into them linearly, SD 1 by 1x1 convolutions; their
context is 1024 wide (OpenCLIP ViT-H/14) and 768 (OpenAI CLIP ViT-L/14)); SDXL (Podell et al.
2023) from its UNet's text_time added conditions (a single file: OpenCLIP ViT-bigG under
conditioner.embedders.1), read with `clip_pair` (ViT-L and bigG side by side, 2048 wide, the
pooled bigG embedded with the image size). The prediction type comes from the scheduler's config;
sampling defaults to dpmpp_2m with Karras sigmas over the model's own sigma range, 25 steps,
guidance 7.5.

Only safetensors are read (limner.checkpoint.SafetensorsFile, never unpickled); a folder that holds only pickled .bin
weights, an SD 3 or Flux folder, a depth or instruct-pix2pix UNet is named as unsupported. The
inpainting models (a UNet of 9 input channels: latent, mask, masked image's latents) load as such.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import limner
from limner.checkpoint import SafetensorsFile, without_init
from limner.noise import ddpm_sigmas
from limner.protocols import Found

PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
             "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
LATER = {"StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxPipeline": "Flux"}
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
           "model.fp16.safetensors")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise limner.LimnerError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise limner.LimnerError(f"{path} is not a JSON object")
    return data


def _weights(part: Path) -> Path:
    for name in WEIGHTS:
        if (part / name).is_file():
            return part / name
    pickled = sorted(p.name for p in part.glob("*.bin")) + sorted(p.name for p in part.glob("*.ckpt"))
    why = (f"it holds only pickled weights ({', '.join(pickled)}), which limner never unpickles (they can run code); "
           "convert them to safetensors" if pickled else "it holds no weights file")
    raise limner.LimnerError(f"{part}: {why} (limner reads {WEIGHTS[0]} or {WEIGHTS[1]})")


def _read(file: Path, prefix: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors in float32, keys prefixed (read as SingleFile reads them)."""
    f = SingleFile(file)
    return {prefix + k: f.tensor(k) for k in f.shapes}


def _text_keys(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Files saved by transformers 4 (the Hub's) name the CLIP parameters text_model.*, those saved
    by transformers 5 leave the prefix out: limner's are text_model.* either way."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in tensors.items() if not k.endswith("position_ids")}


def _header(file: Path) -> dict[str, Any]:
    """Parameters, dtypes and bytes of a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118 - safe_open has no items
            count = sum(int(torch.Size(s.get_shape()).numel()) for s in slices)
            dtypes = sorted({s.get_dtype() for s in slices})
    except (SafetensorError, OSError) as exc:
        raise limner.LimnerError(f"cannot read {file}: {exc}") from None
    return {"parameters": count, "dtype": "/".join(dtypes), "megabytes": round(file.stat().st_size / 1e6, 1)}


class StableDiffusion:
    """detect(path) -> Found | None; load(path) -> (run config, state dict)."""

    def detect(self, path: Path) -> Found | None:
        if path.is_file():
            return self.detect_file(path)
        index = path / "model_index.json"
        if not path.is_dir() or not index.is_file():
            return None
        kind = _json(index).get("_class_name")
        if kind in LATER:
            raise limner.LimnerError(f"{path} is a diffusers {kind} folder: {LATER[kind]} is not supported yet; limner "
                                     "runs Stable Diffusion 1.x, 2.x and SDXL folders")
        if kind not in PIPELINES:
            return None
        unet = _json(path / "unet" / "config.json")
        width = unet.get("cross_attention_dim")
        # SDXL embeds the pooled text and the image size with the time; SD 2 projects into its
        # transformers linearly, SD 1 by 1x1 convolutions
        family = "sdxl" if unet.get("addition_embed_type") == "text_time" else \
            "sd2" if unet.get("use_linear_projection") else "sd1"
        latent = int(_json(path / "vae" / "config.json").get("latent_channels", 4))
        task = _task(path, int(unet.get("in_channels", 4)), latent)
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
        texts = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
        parts = {part: _header(_weights(path / part)) for part in (*texts, "unet", "vae")}
        return Found(family, "diffusers folder", {"pipeline": kind, "task": task, "prediction": scheduler.get(
            "prediction_type", "epsilon"), "context": width, "latent_size": unet.get("sample_size"), "parts": parts})

    def detect_file(self, path: Path) -> Found | None:
        if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
            raise limner.LimnerError(f"{path} is a pickled checkpoint: limner never unpickles a file (unpickling runs "
                                     "whatever code the file holds); use its .safetensors release or convert it")
        if path.suffix.lower() != ".safetensors":
            return None
        f = SingleFile(path)
        what = _what_file(f)
        if what == "unknown":  # no Stable Diffusion UNet in it: not this family's (another may know it)
            return None
        if what is not None:
            raise limner.LimnerError(f"{path} is {what}; limner runs Stable Diffusion 1.x, 2.x and SDXL checkpoints "
                                     "(one .safetensors file with UNet, VAE and text encoders, or a diffusers folder)")
        family, options = _file_config(f)
        parts = {}
        texts = (("text_encoder", XL_L), ("text_encoder_2", XL_G)) if family == "sdxl" else \
            (("text_encoder", "cond_stage_model."),)
        for part, prefix in (*texts, ("unet", UNET), ("vae", VAE)):
            keys = [k for k in f.shapes if k.startswith(prefix)]
            dtypes = sorted({f.dtype(k) for k in keys})
            parts[part] = {"parameters": sum(int(torch.Size(f.shapes[k]).numel()) for k in keys),
                           "dtype": "/".join(dtypes)}
        return Found(family, "single file", {"task": "inpainting" if options["denoiser"]["concat"] else "text-to-image",
                                             "prediction": self.prediction(f), "context": options["context"],
                                             "megabytes": round(path.stat().st_size / 1e6, 1), "parts": parts})

    @staticmethod
    def prediction(f: SingleFile) -> str:
        """The prediction type a file's metadata states (ModelSpec's modelspec.prediction_type), else epsilon."""
        said = str(f.metadata.get("modelspec.prediction_type", f.metadata.get("prediction_type", "epsilon"))).lower()
        return "v_prediction" if said in ("v", "v_prediction", "v-prediction") else "epsilon"

    def load(self, path: Path, prediction: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The run config and state dict; `prediction` ("eps" or "v") overrides what the file or
        the folder's scheduler says (or the epsilon a file that says nothing is assumed to be)."""
        if prediction not in (None, "eps", "v"):
            raise limner.LimnerError(f"prediction must be eps or v, got {prediction!r}")
        if path.is_file():
            return self.load_file(path, prediction)
        found = self.detect(path)
        if found is None:
            raise limner.LimnerError(f"{path} is not a Stable Diffusion 1.x/2.x/SDXL diffusers folder")
        unet, vae = _json(path / "unet" / "config.json"), _json(path / "vae" / "config.json")
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if found.family == "sdxl":  # both encoders at their penultimate block, unnormed; the second's pool
            first, second = (self.text_encoder(path, part, tokenizer) for part, tokenizer in (
                ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")))
            text = {"name": "clip_pair", "first": {**first, "skip": 1, "norm_skip": False},
                    "second": {**second, "skip": 1, "norm_skip": False},
                    "zeros_for_empty": bool(_json(path / "model_index.json").get("force_zeros_for_empty_prompt",
                                                                                True))}
            for options in (text["first"], text["second"]):
                del options["name"]
        else:
            text = self.text_encoder(path, "text_encoder", "tokenizer")
        model = {"text_encoder": text, "autoencoder": self.autoencoder(vae),
                 "denoiser": {**self.denoiser(unet, scheduler, prediction, factor),
                              "concat": int(unet.get("in_channels", 4)) - int(vae.get("latent_channels", 4))},
                 "image_size": int(unet.get("sample_size", 64)) * 2 ** (len(vae["block_out_channels"]) - 1),
                 "channels": int(vae.get("in_channels", 3))}
        sigmas = ddpm_sigmas(model["denoiser"]["betas"], int(scheduler.get("num_train_timesteps", 1000)))
        sample = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "karras"}, "steps": 25, "guidance": 7.5,
                  "sigma_min": float(sigmas[0]), "sigma_max": float(sigmas[-1])}
        config = {"out": str(path), "recipe": "diffusion", "model": model, "sample": sample}
        tensors = {**_read(_weights(path / "unet"), "denoiser.net.unet."), **_read(_weights(path / "vae"),
                                                                                    "autoencoder.")}
        texts = {"text_encoder": "text_encoder.first.", "text_encoder_2": "text_encoder.second."} \
            if found.family == "sdxl" else {"text_encoder": "text_encoder."}
        for part, prefix in texts.items():
            tensors.update(_text_keys(_read(_weights(path / part), ""), prefix))
        return config, tensors

    def load_file(self, path: Path, given: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The run config and state dict of a single file: the model's parameter names (from its
        components built on the meta device: no memory) looked up in the file under their
        original names."""
        f = SingleFile(path)
        family, options = _file_config(f)
        context = options.pop("context")
        prediction = {"eps": "epsilon", "v": "v_prediction"}.get(given) or self.prediction(f)
        options["denoiser"]["prediction"] = prediction
        with without_init(), torch.device("meta"):
            parts = {"text_encoder": _build("text_encoders", options["text_encoder"]),
                     "denoiser": _build("denoisers", options["denoiser"], context_dim=context,
                                        in_channels=options["autoencoder"]["latent_channels"]),
                     "autoencoder": _build("autoencoders", options["autoencoder"])}
        vae = options["autoencoder"]
        tensors = {}
        for part, module in parts.items():
            for key, want in module.state_dict().items():
                if part == "denoiser":
                    name = UNET + module.net.unet.original_name(key.removeprefix("net.unet."))
                    chunk = None
                elif part == "autoencoder":
                    name, chunk = VAE + vae_name(key, len(vae["widths"])), None
                elif family == "sdxl" and key.startswith("first."):
                    name, chunk = XL_L + key.removeprefix("first."), None
                elif family == "sdxl" and key == "second.text_projection.weight":
                    name, chunk = XL_G + "text_projection", None  # stored as x @ P: the Linear's weight is P.T
                elif family in ("sd2", "sdxl"):
                    name, chunk = open_clip_name(key.removeprefix("second."))
                    name = (XL_G if family == "sdxl" else OPEN_CLIP) + name
                else:
                    name, chunk = CLIP_L + key, None
                t = f.tensor(name)
                t = t.T if name == XL_G + "text_projection" else t
                t = t.chunk(3)[chunk] if chunk is not None else t
                tensors[f"{part}.{key}"] = t.reshape(want.shape) if t.numel() == want.numel() else t
        sigmas = ddpm_sigmas("scaled_linear")
        # the size it was trained at: 512 pixels (a 64-latent), 768 for the SD 2 v-prediction models,
        # 1024 for SDXL
        latent = 128 if family == "sdxl" else 96 if prediction == "v_prediction" else 64
        size = latent * 2 ** (len(vae["widths"]) - 1)
        config = {"out": str(path), "recipe": "diffusion",
                  "model": {**options, "image_size": size, "channels": 3},
                  "sample": {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "karras"}, "steps": 25,
                             "guidance": 7.5, "sigma_min": float(sigmas[0]), "sigma_max": float(sigmas[-1])}}
        return config, tensors

    @staticmethod
    def text_encoder(path: Path, part: str, tokenizer: str) -> dict[str, Any]:
        cfg = _json(path / part / "config.json")
        width, act = int(cfg["hidden_size"]), cfg.get("hidden_act", "quick_gelu")
        if int(cfg.get("intermediate_size", 4 * width)) != 4 * width or act not in ("quick_gelu", "gelu"):
            raise limner.LimnerError(f"{path / part}: a CLIP text model with a {cfg.get('intermediate_size')}"
                                     f"-wide MLP and {act!r} is not one limner builds (4x width, quick_gelu or gelu)")
        pad = "end"  # the padding token: special_tokens_map.json (transformers 4) or tokenizer_config.json (5)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / tokenizer / name).is_file():
                token = _json(path / tokenizer / name).get("pad_token")
                token = token.get("content") if isinstance(token, dict) else token
                if token is not None:
                    pad = "!" if token == "!" else "end"
                    break
        return {"name": "clip_text_transformer", "width": width, "layers": int(cfg["num_hidden_layers"]),
                "heads": int(cfg["num_attention_heads"]), "act": act, "pad": pad, "vocab": int(cfg["vocab_size"]),
                "projection": int(cfg.get("projection_dim", 0)) if "WithProjection" in str(cfg.get("architectures"))
                else 0}

    @staticmethod
    def autoencoder(cfg: dict[str, Any]) -> dict[str, Any]:
        return {"name": "autoencoder_kl", "widths": list(cfg["block_out_channels"]),
                "blocks": int(cfg.get("layers_per_block", 2)), "latent_channels": int(cfg.get("latent_channels", 4)),
                "groups": int(cfg.get("norm_num_groups", 32)), "scale": float(cfg.get("scaling_factor", 0.18215))}

    @staticmethod
    def denoiser(cfg: dict[str, Any], scheduler: dict[str, Any], prediction: str | None = None,
                 pixel_factor: int = 8) -> dict[str, Any]:
        channels = list(cfg["block_out_channels"])
        depth = cfg.get("transformer_layers_per_block", 1)
        added = {}
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size numbers
            dim = int(cfg["addition_time_embed_dim"])
            added = {"pooled_dim": int(cfg["projection_class_embeddings_input_dim"]) - 6 * dim, "add_time_dim": dim,
                     "pixel_factor": pixel_factor}
        elif cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
            raise limner.LimnerError(f"a UNet with {cfg.get('addition_embed_type') or cfg.get('class_embed_type')} "
                                     "conditioning is not Stable Diffusion's")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        betas = scheduler.get("beta_schedule", "scaled_linear")
        if betas != "scaled_linear" or (scheduler.get("beta_start"), scheduler.get("beta_end")) not in (
                (0.00085, 0.012), (None, None)):
            raise limner.LimnerError(f"a scheduler with {betas} betas from {scheduler.get('beta_start')} to "
                                     f"{scheduler.get('beta_end')} is not Stable Diffusion's (scaled_linear, 0.00085 "
                                     "to 0.012)")
        return {"name": "sd_unet", "channels": channels, "blocks": int(cfg.get("layers_per_block", 2)),
                "attention": [t.startswith("CrossAttn") for t in cfg["down_block_types"]],
                "heads": list(heads) if isinstance(heads, (list, tuple)) else [int(heads)] * len(channels),
                "linear_projection": bool(cfg.get("use_linear_projection", False)),
                "groups": int(cfg.get("norm_num_groups", 32)), "out_channels": int(cfg.get("out_channels", 4)),
                "prediction": prediction or scheduler.get("prediction_type", "epsilon"), "betas": betas,
                "depth": list(depth) if isinstance(depth, (list, tuple)) else int(depth), **added}


def stable_diffusion() -> StableDiffusion:
    """Stable Diffusion 1.x, 2.x and SDXL from one file or a diffusers folder."""
    return StableDiffusion()


# --- single files in the original (CompVis/Stability) layout --------------------------------------
# One name function per part maps a limner (= diffusers) parameter name to the file's; loading
# asks the file for exactly the names the model needs, so nothing is read twice or kept unused.
# The layouts are CompVis latent-diffusion's (openaimodel.py's input_blocks / middle_block /
# output_blocks, the autoencoder's down.i.block.j, OpenCLIP's resblocks), as diffusers'
# single_file_utils and ComfyUI read them.

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_L, XL_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."  # SDXL's two encoders
OTHER_FILES = {  # a key that marks a file limner cannot run as a model, and what it is
    "lora_unet_": "a LoRA (kohya/A1111 layout), not a model: apply it to one with --lora FILE[:STRENGTH]",
    "lora_te_": "a LoRA (kohya/A1111 layout), not a model: apply it to one with --lora FILE[:STRENGTH]",
    "model.diffusion_model.joint_blocks.": "a Stable Diffusion 3 checkpoint",
    "model.diffusion_model.double_blocks.": "a Flux checkpoint",
    "double_blocks.": "a Flux transformer",
    "joint_blocks.": "a Stable Diffusion 3 transformer",
}


def vae_name(key: str, levels: int) -> str:
    """The original name of a diffusers AutoencoderKL parameter."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    half, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return f"{half}.norm_out.{rest[1]}"
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        if rest[1] == "attentions":
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
            return f"{half}.mid.attn_1.{name}.{rest[-1]}"
        return f"{half}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
    i, kind = int(rest[1]), rest[2]
    level = i if half == "encoder" else levels - 1 - i
    side = "down" if half == "encoder" else "up"
    if kind in ("downsamplers", "upsamplers"):
        return f"{half}.{side}.{level}.{side}sample.conv.{rest[-1]}"
    return f"{half}.{side}.{level}.block.{rest[3]}." + ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")


def open_clip_name(key: str) -> tuple[str, int | None]:
    """The OpenCLIP name of a CLIP text parameter (SD 2), and which third of a fused q/k/v
    projection it is (None where the tensor is whole)."""
    parts = key.split(".")[1:]  # after text_model.
    if parts[0] == "embeddings":
        return ("token_embedding.weight" if parts[1] == "token_embedding" else "positional_embedding"), None
    if parts[0] == "final_layer_norm":
        return f"ln_final.{parts[1]}", None
    i, module, rest = parts[2], parts[3], parts[4:]
    base = f"transformer.resblocks.{i}."
    if module == "self_attn":
        if rest[0] in ("q_proj", "k_proj", "v_proj"):
            return base + f"attn.in_proj_{rest[1]}", "qkv".index(rest[0][0])
        return base + "attn.out_proj." + rest[1], None
    if module == "mlp":
        return base + ("mlp.c_fc." if rest[0] == "fc1" else "mlp.c_proj.") + rest[1], None
    return base + ("ln_1." if module == "layer_norm1" else "ln_2.") + rest[0], None


class SingleFile(SafetensorsFile):
    """A Stable Diffusion .safetensors file: its header until tensors are asked for, each then
    read in float32 (limner.checkpoint.SafetensorsFile: read, not memory-mapped); a file that
    cannot be read, or lacks a tensor the model needs, is named."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError

        try:
            super().__init__(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise limner.LimnerError(f"cannot read {path}: {exc}") from None

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise limner.LimnerError(f"{self.path} has no tensor {key!r}, which this Stable Diffusion model needs: "
                                     "the file is incomplete or of another layout")
        try:
            return self.read(key).float()
        except (OSError, ValueError) as exc:
            raise limner.LimnerError(f"cannot read {self.path}: {exc}") from None

    def indices(self, prefix: str) -> list[int]:
        """The distinct integers right after `prefix` in the file's keys."""
        return sorted({int(k[len(prefix):].split(".")[0]) for k in self.shapes if k.startswith(prefix)})


def _build(kind: str, options: dict[str, Any], **extra: Any):
    options = dict(options)
    return limner.create(kind, options.pop("name"), **options, **extra)


def _task(path: Path, in_channels: int, latent: int) -> str:
    """What a UNet of `in_channels` over `latent`-channel latents is for: text-to-image (the
    latent alone) or inpainting (mask + masked image's latents beside it); others are named."""
    if in_channels == latent:
        return "text-to-image"
    if in_channels == 2 * latent + 1:
        return "inpainting"
    known = {latent + 1: "a depth-conditioned model (SD 2 depth)", 2 * latent: "an instruct-pix2pix model"}
    raise limner.LimnerError(f"{path}: a UNet of {in_channels} input channels over {latent}-channel latents is "
                             f"{known.get(in_channels, 'not a model limner knows')}; limner runs text-to-image UNets "
                             f"({latent} channels) and inpainting ones ({2 * latent + 1})")


def _file_config(f: SingleFile) -> tuple[str, dict[str, Any]]:
    """(family, the model's options) from a single file's keys and shapes."""
    s = f.shapes
    blocks_in = f.indices(UNET + "input_blocks.")
    down = [k for k in blocks_in if f"{UNET}input_blocks.{k}.0.op.weight" in s]
    blocks = down[0] - 1 if down else len(blocks_in) - 1
    levels = len(down) + 1
    firsts = [1 + i * (blocks + 1) for i in range(levels)]
    channels = [s[f"{UNET}input_blocks.{k}.0.out_layers.3.weight"][0] for k in firsts]
    attention = [f"{UNET}input_blocks.{k}.1.proj_in.weight" in s for k in firsts]
    first = firsts[attention.index(True)]
    linear = len(s[f"{UNET}input_blocks.{first}.1.proj_in.weight"]) == 2
    depth = [len(f.indices(f"{UNET}input_blocks.{k}.1.transformer_blocks.")) or 1 for k in firsts]
    context = s[f"{UNET}input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"][1]
    latent = s[VAE + "post_quant_conv.weight"][0]
    in_channels = s[UNET + "input_blocks.0.0.weight"][1]
    _task(f.path, in_channels, latent)
    family = "sdxl" if XL_G + "token_embedding.weight" in s else "sd2" if OPEN_CLIP + "token_embedding.weight" in s \
        else "sd1"
    if family != "sdxl" and depth != [1] * levels:
        raise limner.LimnerError(f"{f.path}: UNet transformers of depths {depth} are not Stable Diffusion 1.x/2.x's "
                                 "(1)")
    heads = {"heads": [8] * levels} if family == "sd1" else {"head_dim": 64}
    vae_levels = len(f.indices(VAE + "encoder.down."))
    unet = {"name": "sd_unet", "channels": list(channels), "blocks": blocks, "attention": attention,
            "linear_projection": linear, "out_channels": s[UNET + "out.2.weight"][0], "concat": in_channels - latent,
            "depth": depth, **heads}
    if family == "sdxl":  # the pooled text and six 256-wide size sinusoids (SDXL's add_time_dim)
        unet.update(pooled_dim=s[UNET + "label_emb.0.0.weight"][1] - 6 * 256, add_time_dim=256,
                    pixel_factor=2 ** (vae_levels - 1))
    widths = [s[f"{VAE}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(vae_levels)]
    vae = {"name": "autoencoder_kl", "widths": widths, "blocks": len(f.indices(VAE + "encoder.down.0.block.")),
           "latent_channels": latent, "scale": 0.13025 if family == "sdxl" else 0.18215}
    if family == "sdxl":  # ViT-L and ViT-bigG, both at their penultimate block without the final norm
        first_width, second_width = (s[XL_L + "text_model.embeddings.token_embedding.weight"][1],
                                     s[XL_G + "token_embedding.weight"][1])
        text = {"name": "clip_pair", "zeros_for_empty": True,
                "first": {"width": first_width, "heads": first_width // 64, "act": "quick_gelu", "pad": "end",
                          "layers": len(f.indices(XL_L + "text_model.encoder.layers.")), "skip": 1,
                          "norm_skip": False, "vocab": s[XL_L + "text_model.embeddings.token_embedding.weight"][0]},
                "second": {"width": second_width, "heads": second_width // 64, "act": "gelu", "pad": "!",
                           "layers": len(f.indices(XL_G + "transformer.resblocks.")), "skip": 1,
                           "norm_skip": False, "projection": s[XL_G + "text_projection"][1],
                           "vocab": s[XL_G + "token_embedding.weight"][0]}}
    elif family == "sd2":
        width = s[OPEN_CLIP + "token_embedding.weight"][1]
        text = {"name": "clip_text_transformer", "width": width, "heads": width // 64, "act": "gelu", "pad": "!",
                "layers": len(f.indices(OPEN_CLIP + "transformer.resblocks.")) - 1,  # SD 2 reads the penultimate
                "vocab": s[OPEN_CLIP + "token_embedding.weight"][0]}
    else:
        width = s[CLIP_L + "text_model.embeddings.token_embedding.weight"][1]
        text = {"name": "clip_text_transformer", "width": width, "heads": width // 64, "act": "quick_gelu",
                "pad": "end", "layers": len(f.indices(CLIP_L + "text_model.encoder.layers.")),
                "vocab": s[CLIP_L + "text_model.embeddings.token_embedding.weight"][0]}
    return family, {"text_encoder": text, "denoiser": unet, "autoencoder": vae, "context": context}


def _what_file(f: SingleFile) -> str | None:
    """What a file is that is no SD 1.x/2.x/SDXL checkpoint (None when it is one, "unknown" when it
    holds no Stable Diffusion UNet and is nothing this family knows)."""
    for prefix, what in OTHER_FILES.items():
        if any(k.startswith(prefix) for k in f.shapes):
            return what
    if UNET + "input_blocks.0.0.weight" not in f.shapes:
        if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in f.shapes):
            return "a bare VAE, not a whole model"
        return "unknown"
    if VAE + "post_quant_conv.weight" not in f.shapes:
        return "a UNet without its VAE (first_stage_model...)"
    if CLIP_L + "text_model.embeddings.token_embedding.weight" not in f.shapes and \
            OPEN_CLIP + "token_embedding.weight" not in f.shapes and XL_G + "token_embedding.weight" not in f.shapes:
        return "a UNet without its text encoder (cond_stage_model... or conditioner...)"
    return None
