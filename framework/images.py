"""Tensor <-> PIL conversion and image grids (images are NCHW floats in [-1, 1])."""
from __future__ import annotations

import io
import os
import re
import textwrap
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .errors import LimnerError


def conform(images: torch.Tensor, channels: int, size: int, device: torch.device, who: str) -> torch.Tensor:
    """[N, 1 or 3, H, W] images as float32 on `device` with `channels` (grey <-> RGB) and
    `size` x `size` pixels (antialiased bilinear resize); `who` names the model in the error."""
    import torch.nn.functional as F

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise LimnerError(f"{who} takes [N, 1 or 3, H, W] images, got {tuple(images.shape)}")
    x = images.float().to(device)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


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


def save_atomic(image: Image.Image, path: str | Path, text: dict[str, str] | None = None,
                replace: bool = True) -> Path:
    """Write a PNG through an exclusive temp file and a rename (limner.files.write_atomic), so a
    reader never sees half a file; `text` goes into the PNG's tEXt chunks (prompt, settings).
    replace=False never overwrites: FileExistsError when `path` exists."""
    from .files import write_atomic

    return write_atomic(path, lambda f: f.write(png_bytes(image, text)), replace=replace)


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """The PNG file of `image`, with `text` in its tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def output_name(index: int, prompt: str, limit: int = 60) -> str:
    """`007-a-red-circle-at-the-top-left.png`: the index keeps order and uniqueness, the slug
    says which prompt made the file (accented letters without their accents: "Ünïcode" ->
    "unicode"; other scripts drop out)."""
    plain = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", plain.lower()).strip("-")[:limit].rstrip("-")
    return f"{index:03d}-{slug or 'prompt'}.png"


_NUMBERED = re.compile(r"^(?:grid-)?(\d+)(?:-.*)?\.png$")


def next_output_index(folder: str | Path) -> int:
    """The first index after every numbered output in `folder` (`007-...png`, `grid-007.png`):
    a new run's files continue the numbering instead of replacing an earlier run's."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(found, default=-1) + 1


def check_writable(folder: str | Path) -> None:
    """Raise one clear line unless files can be written in `folder` (created later, on the
    first write: nothing is left behind when a later check fails)."""
    from .errors import LimnerError

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LimnerError(f"cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LimnerError(f"cannot write to {folder}: {existing} is not writable")
