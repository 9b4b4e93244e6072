"""Tensor <-> PIL conversion and image grids (images are NCHW floats in [-1, 1])."""
from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> N RGB (or L) PIL images."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, 1|3, H, W], got {tuple(images.shape)}")
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def make_grid(images: Sequence[Image.Image], ncols: int, row_labels: Sequence[str] = (),
              pad: int = 2, label_width: int = 0, col_labels: Sequence[str] = ()) -> Image.Image:
    """Tile images row by row; an optional label column names each row and an optional
    header row (text wrapped to the tile width) names each column."""
    w, h = images[0].size
    nrows = -(-len(images) // ncols)
    if row_labels and not label_width:
        label_width = 8 + 7 * max(len(s) for s in row_labels)
    chars = max(w // 6, 4)  # PIL's default bitmap font is about 6 pixels a character
    headers = [textwrap.wrap(t, chars) or [""] for t in col_labels]
    top = 4 + 11 * max((len(lines) for lines in headers), default=0) if headers else 0
    grid = Image.new("RGB", (label_width + ncols * (w + pad) + pad, top + nrows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, img in enumerate(images):
        r, c = divmod(k, ncols)
        grid.paste(img.convert("RGB"), (label_width + pad + c * (w + pad), top + pad + r * (h + pad)))
    for r, label in enumerate(row_labels):
        draw.text((4, top + pad + r * (h + pad) + h // 2 - 5), label, fill="black")
    for c, lines in enumerate(headers):
        draw.multiline_text((label_width + pad + c * (w + pad), 2), "\n".join(lines), fill="black", spacing=1)
    return grid


def save_atomic(image: Image.Image, path: str | Path) -> None:
    """Write a PNG through a temp file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
