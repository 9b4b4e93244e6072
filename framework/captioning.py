"""Image -> text from the framework's side: load a captioner by name or folder, caption images
or image files. The captioners themselves are components (kind `captioners`)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import LimnerError
from .registry import create


def load_captioner(model: str | Path):
    """A registered captioner by name, or a captioner folder: its captioner.json names the
    component that reads it ({"captioner": "<name>", ...})."""
    folder = Path(model)
    if folder.is_dir():
        meta = folder / "captioner.json"
        try:
            name = json.loads(meta.read_text())["captioner"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LimnerError(
                f"{folder} is not a captioner folder: it needs a captioner.json naming its captioner "
                "component (e.g. written by `limner train CONFIG` with recipe = \"captioner\")"
            ) from None
        return create("captioners", name, path=str(folder))
    return create("captioners", str(model))


def read_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """Image files as one [N, C, H, W] batch in [-1, 1]: grey stays one channel, the rest RGB;
    all must share one size and mode."""
    import numpy as np

    from .pipeline import open_image

    batch = []
    for path in paths:
        im = open_image(path)
        array = np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16", "1") else "RGB"), dtype=np.float32)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        batch.append(torch.from_numpy(array.copy()) / 127.5 - 1)
    shapes = {tuple(t.shape) for t in batch}
    if len(shapes) > 1:
        raise LimnerError("images to caption together must share one size and mode; got "
                          + ", ".join(f"{p} {tuple(t.shape)}" for p, t in zip(paths, batch)))
    return torch.stack(batch)


def caption(images: torch.Tensor | Sequence[str | Path], model: str | Path) -> list[str]:
    """Captions of images ([N, C, H, W] in [-1, 1], or image files) by a captioner (name or folder)."""
    captioner = load_captioner(model)
    if not isinstance(images, torch.Tensor):
        images = read_images(images)
    return captioner.caption(images)
