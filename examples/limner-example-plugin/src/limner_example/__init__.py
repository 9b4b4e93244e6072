"""An example limner plugin: one sampler, one loss, one training recipe, one CLI command and one
model family (diffusers' DDPM folders, limner_example/ddpm.py: detector, networks, key map)."""
from __future__ import annotations

import click
import torch

import limner
from limner.sampling import as_floats, bind, report, sampler_spec, to_d


def sample_rk_midpoint(model, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """Explicit midpoint rule (Runge 1895) on the probability-flow ODE, linear in sigma."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        d, dt = to_d(x, sig[i], denoised), sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = x + d * dt
            continue
        mid = sig[i] + dt / 2
        x = x + to_d(x + d * dt / 2, mid, f(x + d * dt / 2, mid)) * dt
    return x


def pseudo_huber(c: float = 0.03):
    """Pseudo-Huber loss sqrt(|x-y|^2 + c^2) - c per sample (Song & Dhariwal 2023)."""
    if c <= 0:
        raise limner.LimnerError(f"pseudo_huber: c must be > 0, got {c}")

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sq = (pred - target).flatten(1).pow(2).sum(dim=1)
        return (torch.sqrt(sq + c * c) - c).mean()

    return loss


@limner.hookimpl
def limner_register_samplers():
    """The explicit midpoint sampler."""
    return [sampler_spec(sample_rk_midpoint, "rk_midpoint")]


@limner.hookimpl
def limner_register_losses():
    """The pseudo-Huber loss."""
    return [limner.ComponentSpec("pseudo_huber", pseudo_huber)]


@limner.hookimpl
def limner_register_recipes():
    """The `prototype` recipe (limner_example/recipe.py)."""
    return [limner.ComponentSpec("prototype", "limner_example.recipe:prototype")]


@limner.hookimpl
def limner_register_families():
    """Unconditional DDPM folders of diffusers (limner_example/ddpm.py)."""
    return [limner.ComponentSpec("ddpm_folders", "limner_example.ddpm:ddpm_folders")]


@limner.hookimpl
def limner_register_denoisers():
    """The DDPM family's UNet (diffusers' UNet2DModel)."""
    return [limner.ComponentSpec("ddpm_unet", "limner_example.ddpm:ddpm_unet")]


@limner.hookimpl
def limner_register_text_encoders():
    """No text, for unconditional models."""
    return [limner.ComponentSpec("unconditional", "limner_example.ddpm:unconditional")]


@limner.hookimpl
def limner_register_commands(cli):
    """Adds `limner example-info`."""

    @cli.command(name="example-info")
    def example_info():
        """Say what the example plugin provides."""
        click.echo("limner-example-plugin provides the sampler rk_midpoint, the loss pseudo_huber and the recipe "
                   "prototype")
