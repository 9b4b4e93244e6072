"""Sampler overhead: each sampler's cost per step with a do-nothing denoiser, next to one
guided forward of the demo model (configs/shapes-tiny.toml: UNet + CLIP-style text encoder,
six prompts, classifier-free guidance doubling the batch), so the sampler's share of a
step shows.
"""
from pathlib import Path

import pytest
import torch

import limner
from limner.config import load_config
from limner.plugins.diffusion_recipe import TextToImage, TrainConfig
from limner.sampling import Guided

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 3, 32, 32)
STEPS = 20
SAMPLERS = limner.list_components("samplers")["samplers"]


class NullDenoiser:
    """Returns its input scaled: the cheapest denoiser that still makes each step do its math."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, **_):
        self.calls += 1
        return x * 0.5


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_step(benchmark, name, device, sync):
    fn = limner.create("samplers", name)
    sigmas = limner.create("schedules", "karras")(STEPS, 0.002, 80.0, device=device)
    x = torch.randn(SHAPE, device=device)
    model = NullDenoiser()

    def run():
        out = fn(model, x * 80.0, sigmas, generator=torch.Generator(device).manual_seed(0))
        sync()
        return out

    assert torch.isfinite(run()).all()
    nfe_per_step = model.calls / STEPS
    benchmark(run)
    benchmark.extra_info.update(group="sampler", steps=STEPS, shape=list(SHAPE), device=device.type,
                                nfe_per_step=nfe_per_step)


def test_denoiser_forward(benchmark, device, sync):
    cfg = load_config(ROOT / "configs" / "shapes-tiny.toml", TrainConfig)
    model = TextToImage(cfg.model).to(device).eval()
    prompts = cfg.sample.prompts[: SHAPE[0]]
    with torch.no_grad():
        cond, uncond = model.encode(prompts), model.encode([""] * len(prompts))
    guided = Guided(model, cfg.sample.guidance)
    x, sigma = torch.randn(SHAPE, device=device), torch.full((SHAPE[0],), 1.0, device=device)

    def run():
        with torch.no_grad():
            out = guided(x, sigma, cond=cond, uncond=uncond)
        sync()
        return out

    benchmark(run)
    params = sum(p.numel() for p in model.denoiser.parameters())
    benchmark.extra_info.update(group="network", shape=list(SHAPE), device=device.type, params=params,
                                model="configs/shapes-tiny.toml, guided (batch x2)")
