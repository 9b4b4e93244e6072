"""The Stable Diffusion 1.x/2.x family: recognises a diffusers folder (model_index.json naming a
StableDiffusionPipeline, with unet/, vae/, text_encoder/, tokenizer/ and scheduler/) and turns it
into a `diffusion` run config over limner's own networks (`clip_text_transformer`,
`autoencoder_kl`, `sd_unet`) and the state dict of that model. Whether it is SD 1 or SD 2 comes
from the UNet's transformers (SD 2 projects into them linearly, SD 1 by 1x1 convolutions; their
context is 1024 wide (OpenCLIP ViT-H/14) and 768 (OpenAI CLIP ViT-L/14)), the prediction
type from the scheduler's config; sampling defaults to dpmpp_2m with Karras sigmas over the model's
own sigma range, 25 steps, guidance 7.5.

Only safetensors are read (memory-mapped, never unpickled); a folder that holds only pickled .bin
weights, an SDXL or SD 3 folder, or an inpainting UNet (9 input channels) is named as unsupported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import limner
from limner.noise import ddpm_sigmas
from limner.protocols import Found

PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
LATER = {"StableDiffusionXLPipeline": "SDXL (issue 29)", "StableDiffusion3Pipeline": "Stable Diffusion 3",
         "FluxPipeline": "Flux", "StableDiffusionXLImg2ImgPipeline": "SDXL (issue 29)"}
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
    """A safetensors file's tensors in float32, keys prefixed (memory-mapped by safe_open)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {prefix + k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 - safe_open has no items
    except (SafetensorError, OSError) as exc:
        raise limner.LimnerError(f"cannot read {file}: {exc}") from None


def _text_key(key: str) -> str:
    """Files saved by transformers 4 (the Hub's) name the CLIP parameters text_model.*, those saved
    by transformers 5 leave the prefix out: limner's are text_model.* either way."""
    head, _, rest = key.partition(".")
    if head != "text_encoder" or rest.startswith(("text_model.", "text_projection")):
        return key
    return f"text_encoder.text_model.{rest}"


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
        index = path / "model_index.json"
        if not path.is_dir() or not index.is_file():
            return None
        kind = _json(index).get("_class_name")
        if kind in LATER:
            raise limner.LimnerError(f"{path} is a diffusers {kind} folder: {LATER[kind]} is not supported yet; limner "
                                     "runs Stable Diffusion 1.x and 2.x folders")
        if kind not in PIPELINES:
            return None
        unet = _json(path / "unet" / "config.json")
        width = unet.get("cross_attention_dim")
        family = "sd2" if unet.get("use_linear_projection") else "sd1"  # SD 2's transformers project linearly
        if unet.get("in_channels") == 9:
            raise limner.LimnerError(f"{path}: inpainting UNets (9 input channels) are not supported yet; limner runs "
                                     "the text-to-image ones (4), which also inpaint by latent blending")
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
        parts = {part: _header(_weights(path / part)) for part in ("text_encoder", "unet", "vae")}
        return Found(family, "diffusers folder", {"pipeline": kind, "prediction": scheduler.get(
            "prediction_type", "epsilon"), "context": width, "latent_size": unet.get("sample_size"), "parts": parts})

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        found = self.detect(path)
        if found is None:
            raise limner.LimnerError(f"{path} is not a Stable Diffusion 1.x/2.x diffusers folder")
        unet, vae = _json(path / "unet" / "config.json"), _json(path / "vae" / "config.json")
        text, scheduler = _json(path / "text_encoder" / "config.json"), _json(path / "scheduler" /
                                                                              "scheduler_config.json")
        model = {"text_encoder": self.text_encoder(path, text), "autoencoder": self.autoencoder(vae),
                 "denoiser": self.denoiser(unet, scheduler),
                 "image_size": int(unet.get("sample_size", 64)) * 2 ** (len(vae["block_out_channels"]) - 1),
                 "channels": int(vae.get("in_channels", 3))}
        sigmas = ddpm_sigmas(model["denoiser"]["betas"], int(scheduler.get("num_train_timesteps", 1000)))
        sample = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "karras"}, "steps": 25, "guidance": 7.5,
                  "sigma_min": float(sigmas[0]), "sigma_max": float(sigmas[-1])}
        config = {"out": str(path), "recipe": "diffusion", "model": model, "sample": sample}
        tensors = {}
        for part, prefix in (("text_encoder", "text_encoder."), ("unet", "denoiser.net.unet."),
                             ("vae", "autoencoder.")):
            tensors.update(_read(_weights(path / part), prefix))
        return config, {_text_key(k): v for k, v in tensors.items() if not k.endswith("position_ids")}

    @staticmethod
    def text_encoder(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
        width, act = int(cfg["hidden_size"]), cfg.get("hidden_act", "quick_gelu")
        if int(cfg.get("intermediate_size", 4 * width)) != 4 * width or act not in ("quick_gelu", "gelu"):
            raise limner.LimnerError(f"{path / 'text_encoder'}: a CLIP text model with a {cfg.get('intermediate_size')}"
                                     f"-wide MLP and {act!r} is not one limner builds (4x width, quick_gelu or gelu)")
        pad = "end"  # the padding token: special_tokens_map.json (transformers 4) or tokenizer_config.json (5)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / "tokenizer" / name).is_file():
                token = _json(path / "tokenizer" / name).get("pad_token")
                token = token.get("content") if isinstance(token, dict) else token
                if token is not None:
                    pad = "!" if token == "!" else "end"
                    break
        return {"name": "clip_text_transformer", "width": width, "layers": int(cfg["num_hidden_layers"]),
                "heads": int(cfg["num_attention_heads"]), "act": act, "pad": pad, "vocab": int(cfg["vocab_size"]),
                "projection": 0}

    @staticmethod
    def autoencoder(cfg: dict[str, Any]) -> dict[str, Any]:
        return {"name": "autoencoder_kl", "widths": list(cfg["block_out_channels"]),
                "blocks": int(cfg.get("layers_per_block", 2)), "latent_channels": int(cfg.get("latent_channels", 4)),
                "groups": int(cfg.get("norm_num_groups", 32)), "scale": float(cfg.get("scaling_factor", 0.18215))}

    @staticmethod
    def denoiser(cfg: dict[str, Any], scheduler: dict[str, Any]) -> dict[str, Any]:
        channels = list(cfg["block_out_channels"])
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
                "prediction": scheduler.get("prediction_type", "epsilon"), "betas": betas}


def stable_diffusion() -> StableDiffusion:
    """Stable Diffusion 1.x and 2.x from a diffusers folder."""
    return StableDiffusion()
