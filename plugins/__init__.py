"""limner's built-in components, each module a plugin of its own.

The `limner` entry point loads this package; the registry then registers every module in
PLUGINS, exactly as it would a third-party plugin.
"""
from . import attention, datasets, denoisers, gans, losses, samplers, schedules, shapes, text_encoders, vae

PLUGINS = (samplers, schedules, datasets, shapes, text_encoders, attention, denoisers, gans, vae, losses)
