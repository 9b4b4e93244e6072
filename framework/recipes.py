"""Dispatch by recipe, at the top of the framework: which config schema, trainer and pipeline
a run's `recipe` ("diffusion", "gan", "vae") means - `train`, `load_run_config`,
`load_pipeline`, `evaluate_checkpoint`. The machinery below (train.py's shared loop and the
diffusion trainer, gan.py and gan_train.py for GANs and VAEs, pipeline.py) never imports this
module, so no import closes a circle.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import find_checkpoint, load_module, read_state
from .config import load_config, set_option, tomllib
from .errors import ConfigError, LimnerError, did_you_mean
from .gan import RECIPES, GeneratorModel, GeneratorPipeline, GenTrainConfig
from .gan_train import GenTrainer
from .images import check_writable
from .pipeline import Pipeline
from .t2i import TextToImage
from .train import TrainConfig, Trainer, evaluate


def recipe_of(config_path: str | Path) -> str:
    """The `recipe` a config names ("diffusion" when it names none)."""
    try:
        recipe = tomllib.loads(Path(config_path).read_text(encoding="utf-8")).get("recipe", "diffusion")
    except (OSError, tomllib.TOMLDecodeError):
        return "diffusion"  # load_config reports the missing or broken file
    if recipe not in RECIPES:
        raise ConfigError(f"{config_path}: recipe: unknown recipe {recipe!r}{did_you_mean(str(recipe), RECIPES)}"
                          f" Valid recipes: {', '.join(RECIPES)}.")
    return recipe


def load_run_config(config_path: str | Path):
    """A TrainConfig, or a GenTrainConfig for the gan and vae recipes."""
    if recipe_of(config_path) == "diffusion":
        return load_config(config_path, TrainConfig)
    return load_config(config_path, GenTrainConfig)


def train(config_path: str | Path, overrides: dict[str, Any] | None = None):
    """Load a config, resume if the run has a checkpoint, train; returns the trainer."""
    cfg = load_run_config(config_path)
    for key, value in (overrides or {}).items():  # dotted keys: "out", "train.steps", ...
        set_option(cfg, key, value)
    check_writable(cfg.out)  # before the model is built, not at the first checkpoint
    trainer = Trainer(cfg) if isinstance(cfg, TrainConfig) else GenTrainer(cfg)
    try:
        trainer.resume()
        if trainer.step >= cfg.train.steps:
            trainer.acc.print(f"{cfg.out} is already trained to step {trainer.step}")
            return trainer
        trainer.fit()
        if cfg.eval.prompts > 0 and trainer.acc.is_main_process:
            scores = evaluate(trainer.pipeline(), cfg.eval)
            (trainer.out / "eval.json").write_text(json.dumps(scores, indent=1))
            trainer.acc.print("held-out attribute scores: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    finally:
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


def load_pipeline(path: str | Path, device: str | torch.device | None = None):
    """A Pipeline (diffusion) or GeneratorPipeline (GAN, VAE) from a checkpoint directory, a
    run's checkpoints/ folder or the run folder."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise LimnerError(f"no checkpoint found at {path} (expected config.toml + *.safetensors, "
                          "or a run folder with checkpoints/latest)")
    cfg = load_run_config(ckpt / "config.toml")
    gan = isinstance(cfg, GenTrainConfig)
    model = GeneratorModel(cfg.model) if gan else TextToImage(cfg.model)
    weights = ckpt / "ema.safetensors"
    load_module(model, weights if weights.is_file() else ckpt / "model.safetensors")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return (GeneratorPipeline if gan else Pipeline)(model, cfg.sample, device)
