"""`limner demo`: what is installed, then the shipped checkpoints side by side — one grid
whose rows are each diffusion model under a few samplers and each GAN or VAE, whose columns
are the prompts (labelled with their text) — and a table of each model's size, training
time, sampling time per image and scores on held-out prompts.

Without a checkpoint, the demo samples from the *exact* denoiser of the first images of the
config's dataset (`shapes` in the built-in demo.toml; the posterior mean under the empirical
data distribution, Karras et al. 2022 eq. 57), so every sampler should land on one of those training images: the printed
distance to the nearest one checks that it did.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ComponentConfig, component, load_config
from .errors import LimnerError
from .files import check_own_folder, write_text_atomic
from .hookspecs import KINDS
from .images import make_grid, save_atomic, to_pil
from .registry import create, list_components, registry
from .sampling import Guided, make_sigmas

DEFAULT_CONFIG = Path(__file__).with_name("demo.toml")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    """What the demo draws: samplers x seeds on one schedule (named by the demo's config: the
    framework names no component), and the dataset whose first images the exact denoiser holds."""

    samplers: list[ComponentConfig] = field(metadata={"kind": "samplers"})
    schedule: ComponentConfig = component("schedules")
    dataset: ComponentConfig = component("datasets")
    steps: int = 20
    seeds: int = 4
    size: int = 32
    images: int = 8
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    checkpoints: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    eval_prompts: int = 100
    # prompts in words the models' training captions never use (issue 27): each diffusion model
    # draws them once, with the first sampler, into a second grid (paraphrases.png)
    paraphrases: list[str] = field(default_factory=list)
    tile: int = 96  # pixels of one image in the grid (upscaled, nearest neighbour)


def training_images(dataset: ComponentConfig, size: int, count: int) -> torch.Tensor:
    """The first `count` images of `dataset` (built at `size`), float64 [count, C, size, size]."""
    data = create("datasets", dataset.name, **{"size": size, **dataset.options})
    if len(data) < count:
        raise LimnerError(f"the demo's dataset {dataset.name} has {len(data)} images; images = {count} asks for more")
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
    # its own grids and scores, nothing of the user's
    check_own_folder(out, {"grid.png", "paraphrases.png", "scores.json"}, "demo")
    report_components()
    found = [find_shipped(c) for c in cfg.checkpoints]
    missing = [c for c, f in zip(cfg.checkpoints, found) if f is None]
    if missing:
        print(f"\nNo checkpoint at {', '.join(repr(m) for m in missing)}.")
    shipped = [f for f in found if f is not None]
    if shipped and cfg.prompts:
        return trained_demo(cfg, shipped, Path(out))
    print("Sampling an exact (analytic) denoiser instead.")
    return exact_demo(cfg, Path(out))


def trained_demo(cfg: DemoConfig, checkpoints: list[Path], out: Path) -> Path:
    """Prompts x (samplers of each diffusion model, each GAN/VAE), and a table of scores."""
    from PIL import Image

    from .checkpoint import read_state
    from .evaluation import evaluate
    from .recipes import load_pipeline, load_run_config

    tiles, labels, table = [], [], []
    said, said_labels = [], []  # the paraphrases' grid
    for ckpt in checkpoints:
        pipe, run_cfg, state = load_pipeline(ckpt), load_run_config(ckpt / "config.toml"), read_state(ckpt)
        diffusion = "samplers" in pipe.features  # a sampled model: one grid row per sampler
        net = getattr(run_cfg.model, "denoiser", None) or getattr(run_cfg.model, "generator", None)
        family = net.name if net is not None else run_cfg.recipe
        print(f"\n{ckpt} ({run_cfg.recipe}, {family}, step {state.get('step')}):")
        for sc in cfg.samplers if diffusion else [None]:
            options = {"sampler": sc.name, "steps": cfg.steps} if sc else {}
            start = time.perf_counter()
            images = pipe(cfg.prompts, seed=0, **options)
            label = f"{ckpt.name} {sc.name}" if sc else f"{ckpt.name} ({run_cfg.recipe}, {family})"
            print(f"  {label:<24} {(time.perf_counter() - start) / len(images):6.3f} s/image")
            tiles += [im.resize((cfg.tile, cfg.tile), Image.Resampling.NEAREST) for im in images]
            labels.append(label)
        if diffusion and cfg.paraphrases:
            images = pipe(cfg.paraphrases, seed=0, sampler=cfg.samplers[0].name, steps=cfg.steps)
            said += [im.resize((cfg.tile, cfg.tile), Image.Resampling.NEAREST) for im in images]
            said_labels.append(f"{ckpt.name} ({run_cfg.model.text_encoder.name})")
        row = {"model": ckpt.name, "recipe": run_cfg.recipe, "family": family, **parameter_counts(pipe.model),
               "train_minutes": (state.get("train_seconds") or float("nan")) / 60}
        if cfg.eval_prompts and run_cfg.eval.metric:
            held_out = dataclasses.replace(run_cfg.eval, prompts=cfg.eval_prompts)
            row |= {"eval_prompts": cfg.eval_prompts, **evaluate(pipe, held_out)}
        table.append(row)
    path = out / "grid.png"
    save_atomic(make_grid(tiles, len(cfg.prompts), labels, col_labels=cfg.prompts), path)
    if said:
        save_atomic(make_grid(said, len(cfg.paraphrases), said_labels, col_labels=cfg.paraphrases),
                    out / "paraphrases.png")
    print("\n" + render_table(table))
    write_text_atomic(out / "scores.json", json.dumps(table, indent=1) + "\n")
    print(f"\nWrote {path} (rows: models and samplers, columns: prompts), "
          + (f"{out / 'paraphrases.png'} (rows: models, columns: prompts in other words) " if said else "")
          + f"and {out / 'scores.json'}.")
    return path


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """Millions of trained parameters, and of frozen ones (a pretrained text encoder)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"params_M": trained / 1e6, "frozen_params_M": frozen / 1e6}


def render_table(rows: list[dict]) -> str:
    """A markdown table of every key any row has (numbers to 3 significant digits)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def exact_demo(cfg: DemoConfig, out: Path) -> Path:
    """Every sampler on the exact denoiser of a dataset's first images; returns the grid path."""
    data = training_images(cfg.dataset, cfg.size, cfg.images)
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
        noise = torch.randn((1, *model.model.shape), generator=gen, dtype=torch.float64)
        out.append(fn(counted, noise * float(sigmas[0]), sigmas, generator=gen))
    return torch.cat(out), calls // cfg.seeds, time.perf_counter() - start
