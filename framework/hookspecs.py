"""The hooks a limner plugin may implement. Each register hook returns ComponentSpecs."""
from __future__ import annotations

import pluggy

PROJECT = "limner"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = (
    "text_encoders",
    "denoisers",
    "autoencoders",
    "generators",
    "discriminators",
    "losses",
    "samplers",
    "schedules",
    "datasets",
    "metrics",
    "feature_networks",
    "captioners",
    "attention_backends",
    "recipes",
    "families",
)


@hookspec
def limner_register_text_encoders():
    """Return ComponentSpecs of text encoders: encode(list[str]) -> TextEmbedding."""


@hookspec
def limner_register_autoencoders():
    """Return ComponentSpecs of autoencoders for latent diffusion: encode(images) -> latents in
    the denoiser's (scaled) space, decode(latents) -> images, latent_shape(channels, size)."""


@hookspec
def limner_register_denoisers():
    """Return ComponentSpecs of denoisers: D(x, sigma, cond) -> x0 estimate."""


@hookspec
def limner_register_generators():
    """Return ComponentSpecs of generators: G(z, cond) -> image (GANs, VAEs)."""


@hookspec
def limner_register_discriminators():
    """Return ComponentSpecs of discriminators: D(image, cond) -> logits."""


@hookspec
def limner_register_losses():
    """Return ComponentSpecs of losses."""


@hookspec
def limner_register_samplers():
    """Return ComponentSpecs of samplers: sample(denoiser, x, sigmas, ...) -> x."""


@hookspec
def limner_register_schedules():
    """Return ComponentSpecs of noise schedules: schedule(n, sigma_min, sigma_max) -> sigmas."""


@hookspec
def limner_register_datasets():
    """Return ComponentSpecs of captioned image datasets."""


@hookspec
def limner_register_metrics():
    """Return ComponentSpecs of metrics."""


@hookspec
def limner_register_feature_networks():
    """Return ComponentSpecs of feature networks for FID/KID/IS: images [N, C, H, W] in [0, 1]
    -> features [N, num_features] (or class logits)."""


@hookspec
def limner_register_captioners():
    """Return ComponentSpecs of captioners: caption(images [N, C, H, W] in [-1, 1]) -> list[str]."""


@hookspec
def limner_register_attention_backends():
    """Return ComponentSpecs of attention backends: attn(q, k, v, mask) -> out."""


@hookspec
def limner_register_recipes():
    """Return ComponentSpecs of training recipes: a factory returning limner.recipes.Recipe
    (config schema, trainer with train_step, model, pipeline), picked by a config's `recipe`."""


@hookspec
def limner_register_families():
    """Return ComponentSpecs of model families limner loads from other tools' files (a Stable
    Diffusion single file, a diffusers folder): a factory returning an object with
    detect(path) -> limner.protocols.Found | None and load(path) -> (run config as a dict,
    the state dict of its recipe's model)."""


@hookspec
def limner_register_commands(cli):
    """Add click commands to the `limner` command group `cli`."""


def register_hook_name(kind: str) -> str:
    """The name of the collect-all hook of one component kind."""
    return f"limner_register_{kind}"
