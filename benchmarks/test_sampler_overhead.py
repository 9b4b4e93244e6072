"""Sampler overhead: each sampler's cost per step with a do-nothing denoiser, next to one
forward of a network of the demo model's size, so the sampler's share of a step shows.

The network is a stand-in until the diffusion issue ships the demo model: a residual conv
stack (GroupNorm, SiLU, 3x3 convs) of ~1M parameters at the 32x32 demo resolution.
"""
import pytest
import torch
from torch import nn

import limner

SHAPE = (4, 3, 32, 32)
STEPS = 20
SAMPLERS = limner.list_components("samplers")["samplers"]


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def stand_in_network(ch: int = 96, blocks: int = 6) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), *[ResBlock(ch) for _ in range(blocks)],
                         nn.Conv2d(ch, 3, 3, padding=1))


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
    net = stand_in_network().to(device).eval()
    x = torch.randn(SHAPE, device=device)

    def run():
        with torch.no_grad():
            out = net(x)
        sync()
        return out

    benchmark(run)
    params = sum(p.numel() for p in net.parameters())
    benchmark.extra_info.update(group="network", shape=list(SHAPE), device=device.type, params=params)
