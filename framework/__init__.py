"""limner: plugin-based text-conditioned image generation.

    import limner
    limner.list_components("samplers")
    euler = limner.create("samplers", "euler")
"""
from .errors import ConfigError, LimnerError, PluginConflictError, UnknownComponentError
from .hookspecs import KINDS, hookimpl
from .registry import ComponentSpec, create, get_component, list_components

__version__ = "0.1.0"


def __getattr__(name: str):
    # load_pipeline pulls in torch, transformers and accelerate: import it on first use only
    if name == "load_pipeline":
        from .recipes import load_pipeline

        return load_pipeline
    if name in ("caption", "load_captioner"):  # image -> text
        from . import captioning

        return getattr(captioning, name)
    raise AttributeError(f"module 'limner' has no attribute {name!r}")


__all__ = [
    "KINDS",
    "ComponentSpec",
    "ConfigError",
    "LimnerError",
    "PluginConflictError",
    "UnknownComponentError",
    "caption",
    "create",
    "get_component",
    "hookimpl",
    "list_components",
    "load_captioner",
    "load_pipeline",
]
