"""LoRA files (Hu et al. 2022) applied to a loaded model: W' = W + strength * (alpha / rank) * up @ down
for each linear or convolution a file names, merged into the weights (no cost per step) or kept
beside them (a forward hook; the strength can change without reloading).

Two file layouts, as the tools that write them spell them:
- kohya / A1111: `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_` for the text encoder (kohya's sd-scripts, ComfyUI's and A1111's loaders);
- diffusers / PEFT: `unet.<module path>.lora_A.weight`, `.lora_B.weight` and `text_encoder.<...>`,
  with alpha from the file's `lora_adapter_metadata` (diffusers' save_lora_weights) or, without
  it, alpha = rank (PEFT's scale 1).

A model exposes the parts a file addresses by a class attribute `lora_part` ("unet",
"text_encoder") on the module whose parameter names are the ones the files use (diffusers' and
transformers' names), or by a method `lora_parts()` -> {part: module} (SDXL's pair of text
encoders: "text_encoder", "text_encoder_2"); a part's `lora_aliases()` -> {other name: own name}
adds the names other layouts use (kohya's SDXL LoRAs name the UNet's layers as the original
checkpoints do: input_blocks_4_1_...). limner.lora knows no network.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LimnerError

KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
PEFT = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
OTHER = {"transformer.": "a transformer model (SD 3, Flux)", "lora_transformer_": "a transformer model (SD 3, Flux)"}


@dataclass
class Pair:
    """One module's update: down [r, in(, k, k)], up [out, r(, 1, 1)], alpha (None: = rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def scale(self) -> float:
        rank = self.down.shape[0]
        return (self.alpha if self.alpha is not None else rank) / rank


def parts(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` a LoRA file can address, by part name (their class's `lora_part`)."""
    found: dict[str, nn.Module] = {}
    for module in model.modules():
        if callable(getattr(module, "lora_parts", None)):
            for part, inner in module.lora_parts().items():
                found.setdefault(part, inner)
        part = getattr(type(module), "lora_part", None)
        if part is not None:
            found.setdefault(part, module)
    return found


def is_lora(path: str | Path) -> bool:
    """Whether a file's keys (its header only) are a LoRA's, of any layout or family."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError):
        return False
    return any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_A." in k or ".lora_down." in k
               for k in keys)


def describe(path: str | Path) -> dict:
    """What a LoRA file holds (`limner inspect`): layout, and per part its layers and ranks."""
    layout, by_part = read(path)
    parts_info = {}
    for part, names in by_part.items():
        ranks = sorted({p.down.shape[0] for p in names.values()})
        parts_info[part] = {"layers": len(names), "rank": ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
                            "parameters": sum(p.down.numel() + p.up.numel() for p in names.values())}
    return {"path": str(path), "format": "LoRA", "layout": {"kohya": "kohya/A1111", "peft": "diffusers/PEFT"}[layout],
            "for": "SDXL" if "text_encoder_2" in by_part else "Stable Diffusion (UNet, CLIP text encoder)",
            "parts": parts_info}


def read(path: str | Path) -> tuple[str, dict[str, dict[str, Pair]]]:
    """(layout, {part: {module path: Pair}}) of a LoRA file; a file of another layout, another
    family or a half-written pair is named."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise LimnerError(f"cannot read the LoRA file {path}: {exc}") from None
    for prefix, what in OTHER.items():
        if any(k.startswith(prefix) for k in tensors):
            raise LimnerError(f"{path} is a LoRA for {what}: limner applies LoRAs to Stable Diffusion 1.x/2.x/SDXL "
                              "models (keys lora_unet_/lora_te_/lora_te1_/lora_te2_ or unet./text_encoder(_2).)")
    if any(k.startswith(tuple(KOHYA)) for k in tensors):
        return "kohya", _kohya(path, tensors)
    if any(k.startswith(tuple(PEFT)) and ".lora_A." in k for k in tensors):
        return "peft", _peft(path, tensors, metadata)
    shown = ", ".join(sorted(tensors)[:3]) or "no tensors"
    raise LimnerError(f"{path} is not a LoRA limner reads (first keys: {shown}); it reads the kohya/A1111 layout "
                      "(lora_unet_..., .lora_down/.lora_up/.alpha) and the diffusers/PEFT one (unet....lora_A/lora_B)")


def _kohya(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Pair]]:
    out: dict[str, dict[str, Pair]] = {}
    other = sorted(k for k in tensors if k.split(".", 1)[-1] not in ("lora_down.weight", "lora_up.weight", "alpha"))
    if other:  # DoRA's dora_scale, LoHa's hada_*, LoKr's lokr_*, LoCon's lora_mid: not plain LoRA
        raise LimnerError(f"{path}: {other[0]!r} is not a plain LoRA's (lora_down, lora_up, alpha); DoRA, LoHa, LoKr "
                          "and CP-decomposed LoCon files are not applied, and leaving part of one out would be wrong")
    names = {k.split(".")[0] for k in tensors}
    for name in sorted(names):
        prefix = next((p for p in KOHYA if name.startswith(p)), None)
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        if prefix is None or down is None or up is None:
            raise LimnerError(f"{path}: {name!r} is not a kohya LoRA pair (want {name}.lora_down.weight and "
                              f"{name}.lora_up.weight under lora_unet_ or lora_te_)")
        alpha = tensors.get(f"{name}.alpha")
        out.setdefault(KOHYA[prefix], {})[name[len(prefix):]] = Pair(down, up, None if alpha is None else
                                                                    float(alpha))
    return out


def _peft(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, dict[str, Pair]]:
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise LimnerError(f"{path}: its lora_adapter_metadata is not JSON") from None
    out: dict[str, dict[str, Pair]] = {}
    for key in sorted(tensors):
        match = re.fullmatch(r"(unet|text_encoder_2|text_encoder)\.(.+)\.lora_A(?:\.default)?\.weight", key)
        if match is None:
            if not re.fullmatch(r".+\.lora_B(?:\.default)?\.weight|.+\.alpha", key):
                raise LimnerError(f"{path}: {key!r} is not a diffusers/PEFT LoRA key (unet.<module>.lora_A.weight, "
                                  "lora_B.weight)")
            continue
        part, module = match.groups()
        up = tensors.get(key.replace(".lora_A", ".lora_B"))
        if up is None:
            raise LimnerError(f"{path}: {key!r} has no lora_B beside it")
        alpha = tensors.get(f"{part}.{module}.alpha")
        alpha = float(alpha) if alpha is not None else _peft_alpha(config.get(f"{part}_lora_adapter_metadata",
                                                                              config), module)
        out.setdefault(PEFT[part + "."], {})[module] = Pair(tensors[key], up, alpha)
    return out


def _peft_alpha(config: dict, module: str) -> float | None:
    """PEFT's lora_alpha for a module over its rank r (alpha_pattern and rank_pattern by name end)."""
    if not isinstance(config, dict) or "lora_alpha" not in config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    rank = config.get("r")
    for pattern, r in (config.get("rank_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            rank = r
    return float(config["lora_alpha"]) if rank is not None else None


def targets(part: str, root: nn.Module, names: dict[str, Pair], layout: str, path: Path) -> dict[nn.Module, Pair]:
    """The modules of one part the file's names address, each checked for shape."""
    modules = {n: m for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names_of = {n: n for n in modules}
    if callable(getattr(root, "lora_aliases", None)):
        names_of.update({alias: n for alias, n in root.lora_aliases().items() if n in modules})
    by_name = {a.replace(".", "_"): n for a, n in names_of.items()} if layout == "kohya" else names_of
    missing = [n for n in names if n not in by_name]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise LimnerError(f"{path}: {len(missing)} of its {part} keys match no layer of this model ({shown}): a LoRA "
                          "for another model or family")
    out = {}
    for name, pair in names.items():
        module = modules[by_name[name]]
        want_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        want_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        kernel = tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else (1, 1)
        rank = pair.down.shape[0]
        got_kernel = tuple(pair.down.shape[2:]) if pair.down.dim() == 4 else (1, 1)
        if pair.down.dim() not in (2, 4) or pair.up.dim() not in (2, 4) or rank < 1 or \
                pair.down.shape[1] != want_in or pair.up.shape[0] != want_out or pair.up.shape[1] != rank or \
                got_kernel != kernel or pair.up[0, 0].numel() != 1:
            raise LimnerError(f"{path}: {part} layer {by_name[name]} is {want_in} -> {want_out}"
                              f"{f' with a {kernel[0]}x{kernel[1]} kernel' if kernel != (1, 1) else ''}, but the "
                              f"LoRA's down is {tuple(pair.down.shape)} and up {tuple(pair.up.shape)}: a LoRA for "
                              "another model size or family")
        out[module] = pair
    return out


def delta(module: nn.Module, pair: Pair) -> torch.Tensor:
    """up @ down * alpha/rank, shaped as the module's weight (float32; a convolution's down holds
    its kernel, [r, in, k, k], and its up is 1x1)."""
    return (pair.up.float().flatten(1) @ pair.down.float().flatten(1)).reshape(module.weight.shape) * pair.scale


class Applied:
    """A LoRA file applied to a model: merged (the weights changed in place) or kept beside
    them as forward hooks whose strength `set_strength` changes."""

    def __init__(self, model: nn.Module, path: str | Path, strength: float = 1.0, merge: bool = True,
                 on_change=None):
        self.path, self.strength, self.merged = Path(path), float(strength), merge
        self.on_change = on_change  # called after every change (a pipeline forgets cached text embeddings)
        layout, by_part = read(self.path)
        have = parts(model)
        unknown = sorted(set(by_part) - set(have))
        if unknown:
            raise LimnerError(f"{self.path} has {', '.join(unknown)} layers, which this model does not expose to LoRA "
                              f"(it has: {', '.join(sorted(have)) or 'none'})")
        self.layout = layout
        self.targets = {m: p for part, names in by_part.items()
                        for m, p in targets(part, have[part], names, layout, self.path).items()}
        self.hooks = []
        if merge:
            with torch.no_grad():
                for module, pair in self.targets.items():
                    module.weight += (self.strength * delta(module, pair)).to(module.weight)
        else:
            self.hooks = [m.register_forward_hook(self._hook(m, p)) for m, p in self.targets.items()]

    def _hook(self, module: nn.Module, pair: Pair):
        down, up = pair.down.float(), pair.up.float()

        def hook(mod, args, output):
            x = args[0]
            d, u = down.to(x), up.to(x)
            if isinstance(mod, nn.Conv2d):
                if d.dim() == 2:
                    d, u = d[:, :, None, None], u[:, :, None, None]
                h = F.conv2d(x, d, None, mod.stride, mod.padding, mod.dilation, mod.groups)
                h = F.conv2d(h, u)
            else:
                h = F.linear(F.linear(x, d.flatten(1)), u.flatten(1))
            return output + (self.strength * pair.scale) * h

        return hook

    def set_strength(self, strength: float) -> None:
        if self.merged:
            raise LimnerError(f"{self.path} is merged into the weights: load it with merge=False to change its "
                              "strength without reloading")
        self.strength = float(strength)
        if self.on_change is not None:
            self.on_change()

    def remove(self) -> None:
        """Take the LoRA off: the hooks removed, or the merged update subtracted."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.merged:
            with torch.no_grad():
                for module, pair in self.targets.items():
                    module.weight -= (self.strength * delta(module, pair)).to(module.weight)
            self.targets = {}
        if self.on_change is not None:
            self.on_change()


def parse_spec(spec: str) -> tuple[str, float]:
    """"FILE[:STRENGTH]" -> (file, strength); the strength defaults to 1."""
    spec = str(spec)
    path, sep, value = spec.rpartition(":")
    if not sep or not path or "/" in value or "\\" in value:
        return spec, 1.0
    try:
        strength = float(value)
    except ValueError:
        raise LimnerError(f"--lora {spec!r}: the strength after the last ':' must be a number (e.g. "
                          "style.safetensors:0.8)") from None
    if not -10 <= strength <= 10:
        raise LimnerError(f"--lora {spec!r}: strength {strength:g} is outside -10..10")
    return path, strength
