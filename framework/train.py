"""The one training loop, on HF Accelerate, which knows no model (as minGPT's trainer): the run
config's shared tables, batches by step and rank, TrainerBase.fit (a recipe's `train_step`,
logging, progress, sample grids, checkpoints, exact resume, the rank check). A recipe's trainer
subclasses TrainerBase (limner.plugins.diffusion_recipe, limner.plugins.generator_recipes);
recipes.py picks one by the config's `recipe` (`limner train CONFIG.toml`). The EMA is in ema.py,
the non-finite guard and divergence watch in guard.py, scoring in evaluation.py.

One script for CPU, one GPU or many (`accelerate launch` / `torchrun`). Every random draw
of step s (batch order, caption dropout, noise levels, noise, dropout) comes from seeds
derived from (seed, s, rank), so a run killed after checkpoint k and resumed continues
exactly as if it had never stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    ATTACHED,
    find_checkpoint,
    load_module,
    load_tensors,
    optimizer_tensors,
    read_state,
    restore_optimizer,
    to_toml,
    write_checkpoint,
)
from .config import ComponentConfig, bounded, check_memory, path_options
from .errors import ConfigError, LimnerError, notice
from .evaluation import EvalConfig, check_eval, evaluate, held_out_items
from .files import remove_stale_temps, write_text_atomic
from .guard import Divergence, NonFinite
from .images import make_grid, save_atomic, to_pil


@dataclass
class DataConfig:
    """[data] of a run: the dataset and how the loop batches it (a recipe may subclass it). The
    dataset is needed to train, not to sample (a model converted from another tool has none)."""

    dataset: ComponentConfig | None = field(default=None, metadata={"kind": "datasets"})
    batch_size: int = bounded(64, ge=1)
    workers: int = bounded(0, ge=0)


@dataclass(kw_only=True)
class LoopConfig:
    """The [train] settings of the one training loop (TrainerBase.fit and setup_data): every
    recipe's [train] schema subclasses it and adds its own (optimiser, loss, ...)."""

    steps: int = bounded(10_000, ge=1)
    # a step whose loss or gradients hold NaN/inf: "skip" it (no update, no EMA) or "stop" the run;
    # max_nonfinite skipped steps in a row also stop it. Checkpoints never hold non-finite weights.
    nonfinite: str = "skip"
    max_nonfinite: int = bounded(10, ge=1)
    # divergence that stays finite: the trained weights' RMS past max_weight_growth x its value
    # when this session started, or a logged loss past max_loss_growth x the median of the run's
    # earlier logged losses, stops the run before its next checkpoint (`latest` stays loadable)
    max_weight_growth: float = bounded(100.0, gt=1)
    max_loss_growth: float = bounded(1000.0, gt=1)
    log_every: int = bounded(25, ge=1)
    sample_every: int = bounded(1000, ge=1)
    checkpoint_every: int = bounded(1000, ge=1)


@dataclass(kw_only=True)
class RunConfig:
    """The top level of every run config: where the run lives, which recipe reads it, its seed
    and the scoring after training. A recipe's schema subclasses it and adds its [data],
    [model], [train] (a LoopConfig) and [sample] tables."""

    out: str
    recipe: str  # which registered recipe reads this config (limner.recipes)
    seed: int = bounded(0, ge=0, le=2**40)  # step seeds are seed * 1_000_003 + ...: kept below 2^64
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_dict(obj: Any) -> Any:
    """A config dataclass as plain TOML-able data (components as {name, ...options})."""
    if isinstance(obj, ComponentConfig):
        return {"name": obj.name, **obj.options}
    if dataclasses.is_dataclass(obj):
        return {f.name: config_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_dict(v) for v in obj]
    return obj


def attach_paths(cfg: Any) -> tuple[Any, dict[str, Path]]:
    """The files and folders a run's [model] components read by path (`gguf_llm`'s path = a
    GGUF file, say) as attachments of its checkpoints - name in their `files/` folder -> where
    they are now - and the config with each such path replaced by files/<name>, so that a
    checkpoint loads from its own folder (load_pipeline confines paths to it) and carries what
    it needs, as a diffusers pipeline folder carries its text encoder."""
    cfg = copy.deepcopy(cfg)
    attached: dict[str, Path] = {}
    for _, component, key, option in path_options(cfg.model):
        source = Path(option).expanduser().resolve()
        if not source.exists():
            continue  # the component itself has said what is wrong with it by now
        name, n = source.name, 2
        while name in attached and attached[name] != source:  # two files of one name: llm.gguf, llm-2.gguf
            name, n = f"{source.stem}-{n}{source.suffix}", n + 1
        attached[name] = source
        component.options[key] = f"{ATTACHED}/{name}"
    return cfg, attached


class StepBatches(torch.utils.data.Sampler):
    """Index batches for steps start, start+1, ...: epoch-seeded permutations, this rank's slice."""

    def __init__(self, size: int, batch: int, seed: int, rank: int, world: int, start: int, steps: int):
        if size < batch * world:
            raise LimnerError(f"dataset of {size} items is smaller than one global batch ({batch * world})")
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self.start, self.steps = start, steps
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        per_epoch = self.size // (self.batch * self.world)
        epoch, k = divmod(step, per_epoch)
        first = (k * self.world + self.rank) * self.batch
        return self._permutation(epoch)[first:first + self.batch].tolist()

    def __iter__(self):
        return (self.indices(s) for s in range(self.start, self.steps))

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)


def check_image_shape(dataset, channels: int, image_size: int, batch_size: int = 1) -> None:
    """The dataset's images must be [channels, image_size, image_size]; say how to fix it if not."""
    expected = (channels, image_size, image_size)
    check_memory(batch_size * math.prod(expected) * 4 * 16, f"a batch of {batch_size} images of "
                 f"{'x'.join(map(str, expected))}", "lower data.batch_size or model.image_size")
    image, _ = dataset[0]
    if tuple(image.shape) != expected:
        raise LimnerError(f"dataset images are {tuple(image.shape)} but model.channels/image_size expect "
                          f"{expected}: set them to match the dataset")


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step on one rank; it also seeds the global RNG (dropout, noise
    inputs), so a resumed run draws exactly what an uninterrupted one would."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
    return gen


def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([img for img, _ in items]), [text for _, text in items]


def adamw(params: list[nn.Parameter], **options: Any) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) as one fused kernel over all parameters where torch has
    one (CPU and CUDA floating tensors): the same update as the per-parameter loop, without
    ~10 kernel launches per parameter tensor per step."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **options)


class TrainerBase:
    """What every recipe's trainer shares: checkpoints, the step-seeded loader, sample grids.
    A subclass sets acc, cfg, out, step, dataset, config_text and opts (name -> optimizer),
    and says which modules a checkpoint holds."""

    seconds_before = 0.0  # training wall time of earlier sessions of this run (from a resume)
    started: float | None = None  # perf_counter() when this session's fit() began

    def setup(self, cfg: Any, mixed_precision: str = "no") -> None:
        """What every trainer's __init__ starts with: the config, the run folder, step 0, the
        accelerator (mixed precision on CUDA only) and the seed, so that every rank builds
        identical initial weights. Then the trainer builds its modules and optimisers and
        calls setup_data()."""
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise LimnerError(f"train.mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        if not cuda and mixed_precision != "no":  # measured: benchmarks/results/bf16-cpu.md
            notice(f"train.mixed_precision = {mixed_precision!r} applies on a GPU; on the CPU limner trains in float32 "
                   "(bf16 autocast made the demo UNet's step 0.7x as fast even with native bf16; set it to \"no\" to "
                   "silence this)")
        precision = mixed_precision if cuda else "no"
        self.cfg, self.out, self.step = cfg, Path(cfg.out), 0
        self.acc = Accelerator(mixed_precision=precision, cpu=not cuda)
        torch.manual_seed(cfg.seed)

    def load_dataset(self):
        """The [data] dataset, built once (a trainer that sizes its model from the data asks first)."""
        if getattr(self, "dataset", None) is None:
            if self.cfg.data.dataset is None:
                raise ConfigError("data.dataset: missing required option: name the dataset to train on, e.g. "
                                  "dataset = { name = \"shapes\" } (see `limner plugins`)")
            self.dataset = self.cfg.data.dataset.build()
        return self.dataset

    def setup_data(self, channels: int | None = None, image_size: int | None = None) -> None:
        """The non-finite guard ([train] nonfinite, max_nonfinite), the dataset (checked against
        the model's image shape, when the model has a fixed one) and the resolved config a
        checkpoint stores."""
        self.guard = NonFinite(self.cfg.train.nonfinite, self.cfg.train.max_nonfinite)
        self.load_dataset()
        stored, self.attachments = attach_paths(self.cfg)
        self.attached_in: dict[str, Path] = {}  # name -> its copy in the last checkpoint written (save)
        self.config_text = to_toml(config_dict(stored))
        if channels is not None and image_size is not None:
            check_image_shape(self.dataset, channels, image_size, self.cfg.data.batch_size)

    def check(self) -> None:
        """Raise now on settings that would fail after training: the [eval] scorers and held-out
        set, the [sample] settings of the pipeline (a recipe with other work after training
        overrides it, with finish)."""
        if self.cfg.eval.prompts > 0:
            check_eval(self.cfg.eval)
        self.pipeline().check()

    def finish(self) -> dict[str, Any] | None:
        """The work after the last step, on the main process: the [eval] scores of held-out
        prompts (None when [eval] prompts = 0); recipes.train writes them to eval.json."""
        if self.cfg.eval.prompts <= 0:
            return None
        return evaluate(self.pipeline(), self.cfg.eval)

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def start_clock(self) -> None:
        self.started = time.perf_counter()

    def train_seconds(self) -> float:
        """Wall time spent in fit() over the run's life (sample grids and checkpoints included)."""
        return self.seconds_before + (0.0 if self.started is None else time.perf_counter() - self.started)

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint if there is one (first removing the temp
        folders of writers that were killed mid-write)."""
        if (self.out / "checkpoints").is_dir():
            for stale in remove_stale_temps(self.out / "checkpoints"):
                self.acc.print(f"removed {stale}: the temp folder of a checkpoint write that was killed")
        ckpt = find_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            return False
        state = read_state(ckpt)
        if state.get("model_config") != config_dict(self.cfg.model) or state.get("recipe") != self.cfg.recipe:
            raise LimnerError(f"{ckpt} was trained with a different [model] config or recipe; "
                              f"use a new `out` folder or restore the config")
        step, seconds, saved = state.get("step"), state.get("train_seconds", 0.0), state.get("optimizers")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise LimnerError(f"{ckpt / 'state.json'}: step must be a whole number >= 0, got {step!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            raise LimnerError(f"{ckpt / 'state.json'}: train_seconds must be a number, got {seconds!r}")
        if not isinstance(saved, dict) or set(self.opts) - set(saved):
            raise LimnerError(f"{ckpt / 'state.json'}: optimizers must hold the state of "
                              f"{', '.join(self.opts)}, got {sorted(saved) if isinstance(saved, dict) else saved!r}")
        for name, module in self.modules().items():
            load_module(module, ckpt / f"{name}.safetensors")
        for name, opt in self.opts.items():
            file = ckpt / f"opt_{name}.safetensors"
            restore_optimizer(opt, load_tensors(file), saved[name], file)
        self.step, self.seconds_before = step, float(seconds)
        self.acc.print(f"resumed from {ckpt} at step {self.step}")
        return True

    def save(self) -> None:
        """Modules, optimisers and state into checkpoints/step_N, atomically (main process)."""
        self.divergence.check(self.step)  # a diverged model never becomes `latest`
        if not self.acc.is_main_process:
            return
        files = {name: m.state_dict() for name, m in self.modules().items()}
        rest = {}
        for name, opt in self.opts.items():
            files[f"opt_{name}"], rest[name] = optimizer_tensors(opt)
        state = {"step": self.step, "recipe": self.cfg.recipe, "optimizers": rest,
                 "train_seconds": round(self.train_seconds(), 1),
                 "model_config": config_dict(self.cfg.model), "time": time.time()}
        folder = self.out / "checkpoints" / f"step_{self.step:07d}"
        # each attachment linked from the last checkpoint's copy where that still exists: on the run's
        # own file system, so a file that had to be copied once (another file system) is not copied again
        last = self.attached_in
        sources = {name: last[name] if name in last and last[name].exists() else source
                   for name, source in self.attachments.items()}
        write_checkpoint(folder, files, self.config_text, state, attachments=sources)
        self.attached_in = {name: folder / ATTACHED / name for name in self.attachments}

    def guarded_step(self, opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: float,
                     grad_clip: float) -> bool:
        """Clip the gradients to grad_clip (0: only measure their norm), then step `opt` unless
        the loss or the norm is not finite (self.guard decides; the gradients are dropped).
        True when the weights were updated."""
        norm = self.acc.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf) if params else 0.0
        if self.guard.check(self.step, loss, float(norm), self.out):
            opt.step()
            return True
        opt.zero_grad(set_to_none=True)
        return False

    def _loader(self, steps: int) -> torch.utils.data.DataLoader:
        """Batches for steps self.step .. steps-1 of this rank."""
        batches = StepBatches(len(self.dataset), self.cfg.data.batch_size, self.cfg.seed, self.acc.process_index,
                              self.acc.num_processes, self.step, steps)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.cfg.data.workers,
                                           collate_fn=collate)

    # --- the one training loop: a recipe's trainer supplies train_step and summary ----------

    def before_fit(self) -> None:
        """Set-up of a recipe's trainer just before the first step (devices, accelerate)."""

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        """One optimisation step on a batch (self.step counts the steps done before it): the
        metrics to log, or None when the step was skipped (non-finite loss or gradients)."""
        raise NotImplementedError

    def summary(self, rows: list[dict[str, float]]) -> dict[str, Any]:
        """What a log line says about the steps since the last one: each metric's mean."""
        keys = dict.fromkeys(k for r in rows for k in r)
        return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        """The progress bar's text for a log line."""
        return {k: f"{v:.3f}" for k, v in row.items() if k != "step" and isinstance(v, float) and math.isfinite(v)}

    def fit(self) -> dict[str, Any]:
        """Train to cfg.train.steps: batches by step and rank, the recipe's train_step, a log
        line every log_every steps, sample grids and checkpoints when due, a progress bar, and
        a final check that every rank holds the same weights; returns the last log line."""
        t = self.cfg.train
        self.start_clock()
        self.before_fit()
        trained = [p for opt in self.opts.values() for group in opt.param_groups for p in group["params"]]
        self.divergence = Divergence(trained, t.max_weight_growth, t.max_loss_growth, self.out)
        log = _Log(self.out, self.acc.is_main_process, self.step)
        self.progress = _progress(self.acc.is_main_process, self.step, t.steps)
        rows, last = [], {}
        try:
            for images, captions in self._loader(t.steps):
                row = self.train_step(images, captions)
                if row is not None:
                    rows.append(row)
                else:  # the non-finite guard skipped it: no update, no EMA, no row
                    self.progress.write(f"step {self.step}: non-finite loss or gradients, step skipped "
                                        f"({self.guard.in_a_row} in a row; train.max_nonfinite = {t.max_nonfinite})")
                self.step += 1
                self.progress.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    last = {"step": self.step, **self.summary(rows), "skipped": self.guard.skipped}
                    log.write(last)
                    loss = last.get("loss")
                    self.divergence.check(self.step, loss if isinstance(loss, float) else None)
                    self.progress.set_postfix(self.postfix(last))
                    rows = []
                self.end_of_step(t.sample_every, t.checkpoint_every, t.steps)
        finally:
            self.progress.close()
            log.close()
        check_ranks_agree(self.acc, nn.ModuleList(self.modules().values()), self.out, self.step)
        return last

    def end_of_step(self, sample_every: int, checkpoint_every: int, steps: int) -> None:
        """The periodic work after a step: a checkpoint and a sample grid when due, both at the last
        step; the checkpoint first, so a grid that fails never costs the steps since the last one."""
        last = self.step == steps
        if self.step % checkpoint_every == 0 or last:
            self.save()
        if self.step % sample_every == 0 or last:
            self.sample_grid()

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Draw the configured prompts with the EMA model into samples/step_N.png."""
        sample = getattr(self.cfg, "sample", None)  # a recipe that draws no images has no [sample]
        if not self.acc.is_main_process or sample is None or not sample.prompts:
            return None
        images = self.pipeline().generate(self.cfg.sample.prompts, seed=0)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        save_atomic(make_grid(to_pil(images), ncols=min(len(images), 8)), path)
        return path


@dataclass(kw_only=True)
class WarmupCosineConfig(LoopConfig):
    """[train] of a model trained by its own loss (LossTrainer): the loop's settings and AdamW
    with a linear warm-up and a cosine decay to zero (a recipe subclasses it for its defaults)."""

    lr: float = bounded(1e-3, gt=0)
    warmup: int = bounded(100, ge=0)
    weight_decay: float = bounded(0.01, ge=0)
    grad_clip: float = bounded(0.0, ge=0)  # 0: no clipping


def warmup_cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """A linear warm-up over `warmup` steps, then a cosine decay to zero at `steps`."""
    return lr * min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


class LossStep(nn.Module):
    """What accelerate (DDP) wraps for a model trained by its `loss(images, captions)`: the loss in one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.model.loss(images, captions)



class LossTrainer(TrainerBase):
    """A trainer for a model that computes its own `loss(images, captions)` (a captioner, a
    matcher): AdamW over its trainable parameters on a warm-up-cosine schedule, guarded steps,
    scored on [eval]'s held-out items. A subclass builds the model, calls use_model(model) and
    writes what it trained in finish()."""

    def data_shape(self) -> tuple[int, int]:
        """(channels, size) of the training images, read off the first item: what a model config
        leaves out (0) is filled from it."""
        image, _ = self.load_dataset()[0]
        return image.shape[0], image.shape[-1]

    def use_model(self, model: nn.Module) -> None:
        """The model, its optimiser and the loader (the end of the subclass's __init__)."""
        self.model = model
        self.trained = [p for p in model.parameters() if p.requires_grad]
        t = self.cfg.train
        self.opt = torch.optim.AdamW(self.trained, lr=t.lr, weight_decay=t.weight_decay)
        self.opts = {"model": self.opt}
        self.setup_data()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def check(self) -> None:
        held_out_items(self.cfg.eval)

    def before_fit(self) -> None:
        self.step_module, self.prepared = self.acc.prepare(LossStep(self.model), self.opt)
        self.model.train()

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        t = self.cfg.train
        step_generator(self.cfg.seed, self.step, self.acc.process_index)  # the loss's randomness (dropout), by step
        for group in self.prepared.param_groups:
            group["lr"] = warmup_cosine(self.step, t.steps, t.lr, t.warmup)
        loss = self.step_module(images.to(self.acc.device), captions)
        self.prepared.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        value = loss.item()
        if not self.guarded_step(self.prepared, self.trained, value, t.grad_clip):
            return None
        return {"loss": value}


def check_ranks_agree(acc, model: nn.Module, out: Path, step: int) -> None:
    """With several processes, every rank must hold the same weights: gather a digest."""
    acc.wait_for_everyone()
    if acc.num_processes == 1:
        return
    digest = torch.tensor([params_digest(model)], dtype=torch.float64, device=acc.device)
    digests = acc.gather(digest).tolist()
    if acc.is_main_process:
        write_text_atomic(out / "ranks.json", json.dumps({"step": step, "digests": digests}))
    if len(set(digests)) != 1:
        raise LimnerError(f"ranks hold different weights after step {step}: {digests}")


class _Log:
    """metrics.jsonl always; TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out: Path, active: bool, step: int = 0):
        self.active, self.writer = active, None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.is_file():  # rows past the resumed checkpoint are logged again: drop the old ones
            rows = path.read_bytes().decode("utf-8", errors="replace").splitlines()
            kept = [line for line in rows if _row_step(line) <= step]
            write_text_atomic(path, "".join(f"{line}\n" for line in kept))
        self.jsonl = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict[str, float | None]) -> None:
        if not self.active:
            return
        row = {k: v if v is None or not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")  # strict JSON: NaN/inf are null
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row (an unreadable row sorts last: dropped on resume)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _progress(active: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", disable=not active, dynamic_ncols=True)


def params_digest(model: nn.Module) -> float:
    """A number that changes with any weight: the sum of |w| * (index + 1) over parameters."""
    return math.fsum(float((p.detach().double().abs().flatten() * torch.arange(1, p.numel() + 1)).sum())
                     for p in model.parameters())
