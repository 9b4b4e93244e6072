"""Scoring a pipeline on held-out prompts (`limner eval`, and a run's [eval] after training):
draw prompt k with seed k, score with registered metrics, against the held-out images where a
metric compares."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import bounded
from .errors import LimnerError
from .registry import create


@dataclass
class EvalConfig:
    """Score samples of held-out prompts with a metric after training (0 prompts: skip)."""

    metric: str = ""
    dataset: dict = field(default_factory=dict)
    prompts: int = bounded(0, ge=0)


def held_out_items(eval_cfg: EvalConfig) -> tuple[torch.Tensor, list[str]]:
    """The first `eval_cfg.prompts` items (0: all) of the [eval] dataset as (images, captions), for a
    recipe that scores something other than drawings (a captioner, a matcher); named if the
    dataset is missing or the count is outside it."""
    spec = dict(eval_cfg.dataset)
    if "name" not in spec:
        raise LimnerError("[eval] dataset: name the held-out dataset the model is scored on, "
                          "e.g. { name = \"shapes\", split = \"test\" }")
    data = create("datasets", spec.pop("name"), **spec)
    n = len(data) if not eval_cfg.prompts else eval_cfg.prompts
    if not 0 < n <= len(data):
        raise LimnerError(f"[eval] prompts must be 0 (all) or 1..{len(data)}, got {eval_cfg.prompts}")
    items = [data[i] for i in range(n)]
    return torch.stack([image for image, _ in items]), [text for _, text in items]


def check_eval(eval_cfg: EvalConfig, metrics: list[str] | None = None) -> tuple[dict[str, Any], Any]:
    """The scorers (name -> metric) and held-out dataset of an evaluation, each checked: an
    unknown metric, a missing dataset or a prompt count outside it is named before any sampling."""
    names = list(metrics) if metrics else ([eval_cfg.metric] if eval_cfg.metric else [])
    if not names:
        raise LimnerError("no metric to evaluate with: the run's config has no [eval] metric; name some with "
                          "--metrics")
    scorers = {name: create("metrics", name) for name in names}
    if "name" not in eval_cfg.dataset:
        raise LimnerError("no held-out dataset to evaluate on: the run's config has no [eval] dataset")
    held_out = create(
        "datasets", eval_cfg.dataset["name"], **{k: v for k, v in eval_cfg.dataset.items() if k != "name"}
    )
    if not 0 < eval_cfg.prompts <= len(held_out):
        raise LimnerError(f"eval prompts must be 1..{len(held_out)} (the held-out dataset's size), "
                          f"got {eval_cfg.prompts}")
    return scorers, held_out


def evaluate(pipeline, eval_cfg: EvalConfig, batch: int = 50, metrics: list[str] | None = None,
             reconstruct: bool = False, **sampling) -> dict[str, float]:
    """Draw the first `eval_cfg.prompts` captions of a held-out dataset with `pipeline` (prompt k
    with seed k; `sampling` options as Pipeline.generate takes them) and score them with each of
    `metrics` (default: the run's metric); a metric that takes `references` gets the held-out
    images of the same prompts. With `reconstruct` (a VAE), the images scored are the held-out
    images passed through the encoder and decoder instead. `seconds_per_image` is the time per image."""
    scorers, held_out = check_eval(eval_cfg, metrics)
    items = [held_out[i] for i in range(eval_cfg.prompts)]
    prompts = [caption for _, caption in items]
    references = torch.stack([image for image, _ in items])
    if reconstruct and sampling:
        raise LimnerError("--reconstruct passes held-out images through a VAE's encoder and decoder: it takes a VAE "
                          f"checkpoint and no sampling options (got {', '.join(sampling)})")
    if reconstruct and "reconstruct" not in pipeline.features:
        raise LimnerError(f"--reconstruct: this {type(pipeline).__name__}'s model has no encoder: only a VAE "
                          "checkpoint reconstructs images")
    start = time.perf_counter()
    if reconstruct:
        images = torch.cat([pipeline.reconstruct(references[i:i + batch], prompts[i:i + batch])
                            for i in range(0, len(prompts), batch)]).cpu()
    else:  # prompt k is drawn with seed k, whatever the batching: its own noise, the same every time
        images = torch.cat([pipeline.generate(prompts[i:i + batch], seed=list(range(i, i + len(prompts[i:i + batch]))),
                                              **sampling) for i in range(0, len(prompts), batch)]).cpu()
    seconds = (time.perf_counter() - start) / len(prompts)
    scores: dict[str, float] = {}
    for name, scorer in scorers.items():
        takes = "references" in inspect.signature(scorer).parameters
        if takes and references.shape != images.shape:
            raise LimnerError(f"{name} compares generated images {tuple(images.shape[1:])} with the held-out ones "
                              f"{tuple(references.shape[1:])}: give [eval] dataset the model's size and channels")
        result = scorer(images, prompts, references=references) if takes else scorer(images, prompts)
        scores.update({k: float(v) for k, v in result.items()})
    return {**scores, "seconds_per_image": seconds}
