"""Training recipes and the dispatch by recipe, at the top of the framework.

A recipe is a component (kind `recipes`, hook `limner_register_recipes`): what a run config's
`recipe = "<name>"` means - the dataclass schema the config is read into, the trainer (a
`limner.train.TrainerBase` that supplies `train_step`; the loop, logging, checkpoints and
exact resume are the framework's), the model a checkpoint's weights load into, and the
pipeline that draws from it. limner's own `diffusion`, `gan` and `vae` are registered by
`limner.plugins.diffusion_recipe` and `limner.plugins.generator_recipes` like any third-party
recipe. `train`, `load_run_config`,
`load_pipeline` and `evaluate_checkpoint` dispatch through it; the machinery below this module
(train.py, pipeline.py) never imports it, so no import closes a circle.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import find_checkpoint, load_module, load_state, read_state, weights_of, without_init
from .config import load_config, path_options, read_toml, set_option
from .errors import ConfigError, LimnerError, UnknownComponentError
from .files import LOCK_NAME, FolderLock, check_own_folder, path_inside, write_text_atomic
from .images import check_writable
from .registry import create, get_component, list_components

if TYPE_CHECKING:  # the training loop is imported by the recipes that train, not by sampling
    from .train import TrainerBase
from .evaluation import evaluate


@dataclass(frozen=True)
class Recipe:
    """What a recipe name stands for. `config`: the run config's dataclass (with `out`,
    `recipe`, `seed`, `data`, `model`, `train` and `eval` sections, and `sample` where it
    draws); `trainer(cfg)` -> a TrainerBase; `model(cfg)` -> the module a checkpoint's weights
    load into; `pipeline(model, cfg.sample, device)` -> what `limner sample` and `limner eval`
    call (None for a recipe that trains something else: a captioner, a matcher); `outputs`:
    the names its trainer's `finish` adds to the run folder."""

    config: type
    trainer: Callable[[Any], TrainerBase]
    model: Callable[[Any], nn.Module]
    pipeline: Callable[[nn.Module, Any, torch.device], Any] | None  # None: the recipe draws no images
    outputs: frozenset[str] = frozenset()  # what its trainer writes into the run folder besides RUN_ENTRIES


def get_recipe(name: str) -> Recipe:
    recipe = create("recipes", name)
    if not isinstance(recipe, Recipe):
        raise LimnerError(f"recipe {name!r} did not build a limner.recipes.Recipe (got {type(recipe).__name__})")
    return recipe


def recipe_of(config_path: str | Path, data: dict[str, Any]) -> str:
    """The `recipe` a run config (its tables, `data`) names; a missing or unknown one is a
    ConfigError listing the registered recipes."""
    known = list_components("recipes")["recipes"]
    if "recipe" not in data:
        raise ConfigError(f"{config_path}: recipe: missing required option: name the training recipe "
                          f"({', '.join(known)}; see `limner plugins`)")
    try:
        return get_component("recipes", str(data["recipe"])).name
    except UnknownComponentError as exc:
        raise ConfigError(f"{config_path}: recipe: {exc}") from None


def load_run_config(config_path: str | Path):
    """A run config read into its recipe's schema (the file is read once)."""
    data = read_toml(config_path)
    return load_config(config_path, get_recipe(recipe_of(config_path, data)).config, data)


RUN_ENTRIES = {"checkpoints", "metrics.jsonl", "samples", "tensorboard", "eval.json", "ranks.json", LOCK_NAME}


def check_run_folder(out: Path, outputs: frozenset[str] = frozenset()) -> None:
    """A run's `out` must be new, empty or a run folder limner made (its checkpoints, logs and
    grids, nothing else): a config whose `out` names a folder of the user's (".", a home, a
    repository) is refused before anything is written there."""
    try:
        check_own_folder(out, RUN_ENTRIES | outputs, "run")
        ckpts = out / "checkpoints"
        if ckpts.is_dir():
            check_own_folder(ckpts, {"latest"} | {p.name for p in ckpts.glob("step_*")}, "run")
    except LimnerError as exc:
        raise ConfigError(f"out: {exc}") from None


def train(config_path: str | Path, overrides: dict[str, Any] | None = None):
    """Load a config, resume if the run has a checkpoint, train; returns the trainer."""
    cfg = load_run_config(config_path)
    for key, value in (overrides or {}).items():  # dotted keys: "out", "train.steps", ...
        set_option(cfg, key, value)
    if not str(cfg.out).strip():
        raise ConfigError(f"{config_path}: out: is empty; name the run's folder (e.g. out = \"runs/shapes\")")
    recipe = get_recipe(cfg.recipe)
    check_run_folder(Path(cfg.out), recipe.outputs)
    check_writable(cfg.out)  # before the model is built, not at the first checkpoint
    trainer = recipe.trainer(cfg)
    trainer.check()  # [eval] and [sample] settings named now, not after training
    lock = FolderLock(cfg.out, "train") if trainer.acc.is_main_process else None  # one trainer per run folder
    try:
        trainer.resume()
        if trainer.step >= cfg.train.steps:
            trainer.acc.print(f"{cfg.out} is already trained to step {trainer.step}")
            return trainer
        trainer.fit()
        scores = trainer.finish() if trainer.acc.is_main_process else None
        if scores is not None:
            write_text_atomic(trainer.out / "eval.json", json.dumps(scores, indent=1))
            trainer.acc.print("held-out scores: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                             if isinstance(v, (int, float))))
    finally:
        if lock is not None:
            lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()  # else gloo's threads may abort the exit
    return trainer


def evaluate_checkpoint(path: str | Path, prompts: int | None = None, metrics: list[str] | None = None,
                        reconstruct: bool = False, **sampling) -> dict[str, Any]:
    """A checkpoint's scores on its run's held-out prompts (`limner eval`): the run's metric, or `metrics`."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise LimnerError(f"no checkpoint found at {path}")
    cfg = load_run_config(ckpt / "config.toml")
    eval_cfg = dataclasses.replace(cfg.eval, prompts=prompts or cfg.eval.prompts or 200)
    scores = evaluate(load_pipeline(ckpt), eval_cfg, metrics=metrics, reconstruct=reconstruct, **sampling)
    return {"checkpoint": str(ckpt), "step": read_state(ckpt).get("step"),
            "metric": ", ".join(metrics) if metrics else eval_cfg.metric, "prompts": eval_cfg.prompts,
            "sampling": sampling, **({"reconstruct": True} if reconstruct else {}), "scores": scores}


def confine_paths(section: Any, ckpt: Path) -> None:
    """A checkpoint's config comes from whoever made the checkpoint: a file path among its
    components' options (`path = ...`) is resolved inside the checkpoint folder, and one that
    is absolute or leads out of it is refused, never read from the working folder. (A run's
    checkpoints carry the files its [model] reads: `attach_paths`.)"""
    for field_name, value, key, option in path_options(section):
        inside = path_inside(ckpt, option)
        if inside is None:
            raise LimnerError(f"{ckpt / 'config.toml'}: {field_name} {value.name!r} reads {key} = {option!r}, which is "
                              "outside the checkpoint folder; a checkpoint's files must lie inside it (copy them "
                              "there and give a path relative to it)")
        value.options[key] = str(inside)


def find_family(path: str | Path):
    """(family name, the family, what it found) for a file or folder a registered family
    recognises (a Stable Diffusion single file, a diffusers folder), else None."""
    for name in list_components("families")["families"]:
        family = create("families", name)
        found = family.detect(Path(path))
        if found is not None:
            return name, family, found
    return None


def describe(path: str | Path) -> dict[str, Any]:
    """What a path holds (`limner inspect`): a limner checkpoint's recipe, step and model config,
    a LoRA's or a GGUF language model's layout, or what a registered family found in another
    tool's file or folder."""
    ckpt = find_checkpoint(path)
    if ckpt is not None:
        data = read_toml(ckpt / "config.toml")
        state = read_state(ckpt)
        return {"path": str(ckpt), "format": "limner checkpoint", "recipe": data.get("recipe"),
                "step": state.get("step"), "model": data.get("model", {})}
    from . import gguf, lora

    if lora.is_lora(path):
        return lora.describe(path)
    if Path(path).is_file() and gguf.is_gguf(path):
        return gguf.describe(path)
    found = find_family(path) if Path(path).exists() else None
    if found is None:
        families = ", ".join(list_components("families")["families"]) or "none registered"
        raise LimnerError(f"{path} is neither a limner checkpoint nor a model file or folder of a family limner reads "
                          f"({families})")
    name, _, what = found
    return {"path": str(path), "format": what.form, "family": what.family, "reader": name, **what.facts}


def load_pipeline(path: str | Path, device: str | torch.device | None = None, prediction: str | None = None,
                  lora: list[str | tuple[str, float]] | None = None, dtype: str | None = None):
    """The pipeline of a checkpoint directory, a run's checkpoints/ folder or the run folder,
    as its recipe builds it (diffusion: Pipeline; GAN, VAE: GeneratorPipeline), or of another
    tool's file or folder that a registered family recognises (`prediction`, "eps" or "v":
    what such a file's model predicts, where the file does not say), with the LoRA files of
    `lora` merged in ("FILE[:STRENGTH]" or (file, strength); pipe.load_lora for more choice), its
    weights held in `dtype` (diffusion: "bfloat16" or "float32"; default the checkpoint's
    `[sample] dtype`) once the LoRAs are in."""
    from .lora import parse_spec

    specs = [parse_spec(x) if isinstance(x, (str, Path)) else (str(x[0]), float(x[1])) for x in (lora or [])]
    pipe = _pipeline(path, device, prediction)
    for file, strength in specs:
        pipe.load_lora(file, strength)
    if "dtype" in pipe.features:
        pipe.hold(dtype or pipe.defaults.dtype)
    elif dtype is not None:
        raise LimnerError(f"dtype {dtype}: {path} is a GAN or VAE checkpoint, which draws in float32; the dtype "
                          "choice is for diffusion checkpoints")
    return pipe


def _pipeline(path: str | Path, device: str | torch.device | None, prediction: str | None):
    ckpt = find_checkpoint(path)
    if ckpt is not None and prediction is not None:
        raise LimnerError(f"--prediction is for model files of other tools, which may not say what they predict; "
                          f"{ckpt} is a limner checkpoint, whose config says it")
    if ckpt is None:
        foreign = find_family(path) if Path(path).exists() else None
        if foreign is None:
            families = ", ".join(list_components("families")["families"]) or "none registered"
            raise LimnerError(f"no checkpoint found at {path}: expected a limner checkpoint (config.toml + "
                              "*.safetensors, or a run folder with checkpoints/latest) or a model file or folder of a "
                              f"family limner reads ({families}; `limner inspect PATH` says what a file is)")
        return _foreign_pipeline(path, *foreign, device, prediction)
    cfg = load_run_config(ckpt / "config.toml")
    confine_paths(cfg.model, ckpt)
    recipe = get_recipe(cfg.recipe)
    if recipe.pipeline is None:
        raise LimnerError(f"{ckpt} is a {cfg.recipe!r} checkpoint, which draws no images (recipes that draw: "
                          f"{', '.join(n for n in list_components('recipes')['recipes'] if get_recipe(n).pipeline)})")
    model = recipe.model(cfg)
    load_module(model, weights_of(ckpt))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = recipe.pipeline(model, cfg.sample, device)
    for spec in getattr(cfg.sample, "lora", None) or []:  # [sample] lora: files inside the checkpoint
        from .lora import parse_spec

        file, strength = parse_spec(spec)
        inside = (ckpt / file).resolve()
        if Path(file).is_absolute() or not inside.is_relative_to(ckpt.resolve()):
            raise LimnerError(f"{ckpt / 'config.toml'}: [sample] lora names {file!r}, which is outside the checkpoint "
                              "folder; a checkpoint's files must lie inside it (copy the LoRA there and name it "
                              "relative to it)")
        pipe.load_lora(inside, strength)
    return pipe


def _foreign_pipeline(path: str | Path, name: str, family, found, device, prediction: str | None = None):
    """A pipeline from a family's run config and state dict (checked as a checkpoint's are)."""
    data, tensors = family.load(Path(path), **({"prediction": prediction} if prediction else {}))
    cfg = load_config(Path(path), get_recipe(recipe_of(path, data)).config, data)
    recipe = get_recipe(cfg.recipe)
    with without_init(), torch.device("meta"):  # no weights for a model whose every weight comes from the
        model = recipe.model(cfg)  # file: its tensors become the parameters, never copied twice
    computed = set(dict(model.named_buffers())) - set(model.state_dict())
    if computed:  # buffers a module computes when built (position tables) are in no file: build it for real
        with without_init():
            model = recipe.model(cfg)
    load_state(model, tensors, path, assign=not computed)
    del tensors  # the model holds them now: the dict's references would keep every replaced one (channels-last
    # copies, a bf16 hold) alive beside its replacement, 2.2 GB more at the peak for an SD 1.5 file
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LimnerError(f"{path}: the {found.family} reader left {len(left)} tensors unset ({', '.join(left[:3])})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = recipe.pipeline(model, cfg.sample, device)
    pipe.found = found
    return pipe
