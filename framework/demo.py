"""`limner demo`: what is installed, then prompts x samplers from the shipped checkpoint
with its attribute score on held-out prompts.

Without a checkpoint, the demo samples from the *exact* denoiser of a few images of the
`shapes` dataset (the posterior mean under the empirical data distribution, Karras et al.
2022 eq. 57), so every sampler should land on one of those training images: the printed
distance to the nearest one checks that it did.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ComponentConfig, component, components, load_config
from .hookspecs import KINDS
from .images import make_grid, save_atomic, to_pil
from .registry import create, list_components, registry
from .sampling import Guided, make_sigmas

DEFAULT_CONFIG = Path(__file__).with_name("demo.toml")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    """What the demo draws: samplers x seeds on one schedule."""

    samplers: list[ComponentConfig] = components("samplers", "euler", "heun", "dpmpp_2m")
    schedule: ComponentConfig = component("schedules", "karras")
    steps: int = 20
    seeds: int = 4
    size: int = 32
    images: int = 8
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    checkpoint: str = "checkpoints/shapes-tiny"
    prompts: list[str] = field(default_factory=list)
    eval_prompts: int = 100


def training_images(size: int, count: int) -> torch.Tensor:
    """The first `count` images of the `shapes` dataset, float64 [count, 3, size, size]."""
    data = create("datasets", "shapes", size=size, length=count)
    return torch.stack([data[i][0] for i in range(count)]).double()


class ExactDenoiser:
    """D(x, sigma) = E[x0 | x] for x0 uniform over `data`: a softmax-weighted mean."""

    def __init__(self, data: torch.Tensor):
        self.data = data.flatten(1)
        self.shape = data.shape[1:]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        flat = x.flatten(1).double()
        logits = -torch.cdist(flat, self.data) ** 2 / (2 * sigma.double()[:, None] ** 2)
        return (logits.softmax(dim=1) @ self.data).view(x.shape).to(x.dtype)


def report_components() -> None:
    """Print the installed components per kind and what is still missing."""
    comps = list_components()
    print("Installed components:")
    for kind in KINDS:
        names = comps[kind]
        print(f"  {kind:<19} {', '.join(names) if names else '-- none installed'}")
    missing = ([] if comps["text_encoders"] else ["a text encoder"]) + \
        ([] if comps["denoisers"] or comps["generators"] else ["a denoiser or generator"])
    if missing:
        print(f"\nMissing for text-to-image generation: {' and '.join(missing)}.")
    for failure in registry().failures:
        print(f"  ! {failure}")


def find_shipped(name: str) -> Path | None:
    """The demo checkpoint, relative to the working directory or the limner checkout."""
    for base in (Path.cwd(), REPO):
        path = Path(name) if Path(name).is_absolute() else base / name
        if (path / "config.toml").is_file():
            return path
    return None


def run_demo(config_path: str | None, out: str) -> Path:
    """Run the demo; returns the path of the written grid."""
    cfg = load_config(config_path or DEFAULT_CONFIG, DemoConfig)
    report_components()
    ckpt = find_shipped(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and cfg.prompts:
        return trained_demo(cfg, ckpt, Path(out))
    print(f"\nNo checkpoint at {cfg.checkpoint!r}: sampling an exact (analytic) denoiser instead.")
    return exact_demo(cfg, Path(out))


def trained_demo(cfg: DemoConfig, ckpt: Path, out: Path) -> Path:
    """Prompts x samplers from a trained checkpoint, and its score on held-out prompts."""
    from .pipeline import load_pipeline
    from .train import EvalConfig, evaluate, TrainConfig

    pipe = load_pipeline(ckpt)
    run_cfg = load_config(ckpt / "config.toml", TrainConfig)
    print(f"\nCheckpoint {ckpt} (step {json.loads((ckpt / 'state.json').read_text()).get('step')}):"
          f" {len(cfg.prompts)} prompts x {len(cfg.samplers)} samplers, {cfg.steps} steps, seed 0")
    tiles = []
    for sc in cfg.samplers:
        start = time.perf_counter()
        tiles += pipe(cfg.prompts, sampler=sc.name, steps=cfg.steps, seed=0)
        print(f"  {sc.name:<20} {time.perf_counter() - start:6.2f} s")
    path = out / "grid.png"
    save_atomic(make_grid(tiles, len(cfg.prompts), [sc.name for sc in cfg.samplers]), path)
    if cfg.eval_prompts and run_cfg.eval.metric:
        held_out = EvalConfig(run_cfg.eval.metric, run_cfg.eval.dataset, cfg.eval_prompts)
        scores = evaluate(pipe, held_out)
        print(f"\nAttribute score on {cfg.eval_prompts} held-out prompts ({run_cfg.sample.sampler.name},"
              f" {run_cfg.sample.steps} steps): colour {scores['colour']:.1%}, shape {scores['shape']:.1%},"
              f" position {scores['position']:.1%}, all three {scores['all']:.1%}")
    print(f"\nWrote {path} (rows: samplers, columns: prompts).")
    return path


def exact_demo(cfg: DemoConfig, out: Path) -> Path:
    """Every sampler on the exact denoiser of a few shapes images; returns the grid path."""
    data = training_images(cfg.size, cfg.images)
    model = Guided(ExactDenoiser(data), 1.0)
    sigmas = make_sigmas(cfg.schedule.name, cfg.steps, cfg.sigma_min, cfg.sigma_max, **cfg.schedule.options)
    print(f"\n{cfg.steps} steps of the {cfg.schedule.name} schedule, {cfg.seeds} seeds per sampler:")
    print(f"  {'sampler':<20} {'NFE':>5} {'seconds':>8} {'RMS to nearest image':>22}")
    tiles, labels = [], []
    for sc in cfg.samplers:
        images, nfe, seconds = _draw(sc, model, sigmas, cfg)
        nearest = torch.cdist(images.flatten(1).double(), data.flatten(1)).min(dim=1).values
        rms = (nearest / data[0].numel() ** 0.5).max().item()
        print(f"  {sc.name:<20} {nfe:>5} {seconds:>8.2f} {rms:>22.4f}")
        tiles += to_pil(images.float())
        labels.append(sc.name)
    path = out / "grid.png"
    save_atomic(make_grid(tiles, cfg.seeds, labels), path)
    print(f"\nWrote {path} (rows: samplers, columns: seeds).")
    return path


def _draw(sc: ComponentConfig, model, sigmas, cfg: DemoConfig):
    calls = 0

    def counted(x, sigma, **kw):
        nonlocal calls
        calls += x.shape[0]
        return model(x, sigma, **kw)

    fn, out = sc.build(), []
    start = time.perf_counter()
    for seed in range(cfg.seeds):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, 3, cfg.size, cfg.size), generator=gen, dtype=torch.float64)
        out.append(fn(counted, noise * float(sigmas[0]), sigmas, generator=gen))
    return torch.cat(out), calls // cfg.seeds, time.perf_counter() - start
