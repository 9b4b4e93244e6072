"""`shapes`: a seeded, procedurally drawn, captioned dataset, and the `shapes_attributes`
metric that tells whether a generated image shows the colours, shapes and positions its
prompt asked for.

Captions follow one grammar, e.g. "a small red circle at the top left and a blue square
at the bottom": each object is an optional size, a colour, a shape and one of nine grid
positions. Colours and positions are distinct within an image, so the scorer can find
each object by its colour alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

import limner

COLOURS = {  # RGB in [0, 1], far apart so a blurry sample still snaps to the right one
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUND = (0.25, 0.25, 0.25)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "": 0.13, "large": 0.16}  # radius as a fraction of the image side
POSITIONS = {  # (row, column) of a 3x3 grid
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SPLIT_SEEDS = {"train": 0, "test": 1_000_000_007}
OBJECT_RE = re.compile(
    rf"an? (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the "
    rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})$")


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: its size word ('' for medium), colour, shape and grid position."""

    size: str
    colour: str
    shape: str
    position: str

    def phrase(self) -> str:
        size = f"{self.size} " if self.size else ""
        return f"a {size}{self.colour} {self.shape} at the {self.position}"


def caption(objects: list[ShapeObject]) -> str:
    """'a small red circle at the top left and a blue square at the bottom'."""
    return " and ".join(o.phrase() for o in objects)


def parse_caption(text: str) -> list[ShapeObject]:
    """The objects a shapes caption describes; raises naming the part it cannot read."""
    objects = []
    for part in text.strip().lower().split(" and "):
        match = OBJECT_RE.match(part.strip())
        if not match:
            raise limner.LimnerError(
                f"cannot read {part!r} in the shapes prompt {text!r}: expected "
                f"'a [small|large] <colour> <shape> at the <position>' with colours {', '.join(COLOURS)}, "
                f"shapes {', '.join(SHAPES)} and positions {', '.join(POSITIONS)}")
        objects.append(ShapeObject(match[1] or "", match[2], match[3], match[4]))
    return objects


def random_scene(gen: torch.Generator, max_objects: int, min_objects: int = 1) -> list[ShapeObject]:
    """min_objects..max_objects objects with distinct colours and distinct positions."""
    def pick(seq, k):
        return [seq[i] for i in torch.randperm(len(seq), generator=gen)[:k].tolist()]

    n = int(torch.randint(min_objects, max_objects + 1, (), generator=gen))
    colours, positions = pick(list(COLOURS), n), pick(list(POSITIONS), n)
    shapes = [SHAPES[int(torch.randint(len(SHAPES), (), generator=gen))] for _ in range(n)]
    sizes = [list(SIZES)[int(torch.randint(len(SIZES), (), generator=gen))] for _ in range(n)]
    return [ShapeObject(*attrs) for attrs in zip(sizes, colours, shapes, positions)]


AREA_PER_R2 = {"circle": 3.1416, "square": (2 * 0.886) ** 2, "triangle": 1.15 * 2.2}
# a triangle's centroid lies 2/3 of its height (2.2 r) below the apex at -1.1 r
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 2 / 3 * 2.2 - 1.1}


def draw_mask(shape: str, cy: float, cx: float, r: float, size: int) -> torch.Tensor:
    """Boolean [size, size] mask of a shape of 'radius' r centred at (cy, cx) in pixels."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (dy.abs() <= r * 0.886) & (dx.abs() <= r * 0.886)  # the circle's area
    frac = (dy + r * 1.1) / (r * 2.2)  # upward triangle: half-width grows towards the base
    return (dy.abs() <= r * 1.1) & (dx.abs() <= frac * r * 1.15)


def shape_mask(obj: ShapeObject, size: int) -> torch.Tensor:
    """Boolean [size, size] mask of one object, centred in its grid cell."""
    row, col = POSITIONS[obj.position]
    return draw_mask(obj.shape, (row + 0.5) * size / 3, (col + 0.5) * size / 3, SIZES[obj.size] * size, size)


def render(objects: list[ShapeObject], size: int) -> torch.Tensor:
    """[3, size, size] image in [-1, 1]."""
    img = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, size, size).clone()
    for obj in objects:
        img[:, shape_mask(obj, size)] = torch.tensor(COLOURS[obj.colour]).view(3, 1)
    return img * 2 - 1


class ShapesDataset(torch.utils.data.Dataset):
    """Coloured shapes at named positions with captions; item i is the same on every run."""

    def __init__(self, size: int = 32, length: int = 50_000, max_objects: int = 2, split: str = "train",
                 seed: int = 0, min_objects: int = 1):
        if split not in SPLIT_SEEDS:
            raise limner.LimnerError(f"shapes: unknown split {split!r}. Valid: {', '.join(SPLIT_SEEDS)}.")
        if not 1 <= max_objects <= len(COLOURS):
            raise limner.LimnerError(f"shapes: max_objects must be 1..{len(COLOURS)}, got {max_objects}")
        if not 1 <= min_objects <= max_objects:
            raise limner.LimnerError(f"shapes: min_objects must be 1..max_objects ({max_objects}), got {min_objects}")
        if size < 32:  # the scorer reads every shape at 32px; at 24px only 77% (small ones blur)
            raise limner.LimnerError(f"shapes: size must be >= 32 pixels, got {size}")
        self.size, self.length, self.max_objects, self.min_objects = size, length, max_objects, min_objects
        self.base_seed = SPLIT_SEEDS[split] + seed * 7919

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> list[ShapeObject]:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} out of range 0..{self.length - 1}")
        return random_scene(torch.Generator().manual_seed(self.base_seed + index), self.max_objects, self.min_objects)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        objects = self.scene(index)
        return render(objects, self.size), caption(objects)


class ShapesScorer:
    """Checks colour, shape and position of every object a prompt describes.

    Each pixel snaps to the nearest palette colour (or background); an object's colour is
    right when enough pixels of it appear, its shape is read from how much of its bounding
    box it fills (square ~1, circle ~0.79, triangle ~0.5), its position from its centroid.
    """

    def __init__(self, min_area: float = 0.35, max_distance: float = 0.35):
        self.min_area, self.max_distance = min_area, max_distance
        self.palette = torch.tensor([BACKGROUND, *COLOURS.values()])  # [1 + colours, 3]

    def labels(self, image: torch.Tensor) -> torch.Tensor:
        """[H, W] palette index per pixel: 0 background, k colour k-1, -1 nothing close."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise limner.LimnerError(f"shapes scorer expects [3, H, W] images, got {tuple(image.shape)}")
        rgb = ((image.detach().float().cpu() + 1) / 2).permute(1, 2, 0)  # [H, W, 3] in [0, 1]
        dist = torch.cdist(rgb.reshape(-1, 3), self.palette).view(*rgb.shape[:2], -1)
        best, idx = dist.min(dim=-1)
        return torch.where(best <= self.max_distance, idx, torch.full_like(idx, -1))

    def check(self, image: torch.Tensor, prompt: str) -> list[dict[str, bool]]:
        """Per object of the prompt: {'colour': ..., 'shape': ..., 'position': ...}."""
        labels = self.labels(image)
        size = labels.shape[0]
        names = list(COLOURS)
        results = []
        for obj in parse_caption(prompt):
            mask = labels == names.index(obj.colour) + 1
            expected = shape_mask(obj, size).sum().item()
            if mask.sum() < self.min_area * expected:
                results.append({"colour": False, "shape": False, "position": False})
                continue
            ys, xs = mask.nonzero(as_tuple=True)
            cell = (min(int(ys.float().mean() * 3 / size), 2), min(int(xs.float().mean() * 3 / size), 2))
            results.append({"colour": True, "shape": self.shape_of(mask, ys, xs) == obj.shape,
                            "position": cell == POSITIONS[obj.position]})
        return results

    @staticmethod
    def shape_of(mask: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> str:
        """The shape whose ideal mask, fitted to this blob's centroid and area, overlaps it best
        (centroid and area, unlike a bounding box, shrug off a few stray pixels)."""
        cy, cx, area = ys.float().mean().item() + 0.5, xs.float().mean().item() + 0.5, mask.sum().item()

        def iou(shape: str) -> float:
            r = (area / AREA_PER_R2[shape]) ** 0.5
            ideal = draw_mask(shape, cy - CENTROID_DROP[shape] * r, cx, r, mask.shape[0])
            return (ideal & mask).sum().item() / max((ideal | mask).sum().item(), 1)

        return max(SHAPES, key=iou)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Fractions of objects with the right colour, shape and position, and all three."""
        if len(images) != len(prompts):
            raise limner.LimnerError(f"{len(images)} images but {len(prompts)} prompts")
        rows = [r for img, p in zip(images, prompts) for r in self.check(img, p)]
        out = {k: sum(r[k] for r in rows) / len(rows) for k in ("colour", "shape", "position")}
        out["all"] = sum(all(r.values()) for r in rows) / len(rows)
        out["objects"] = len(rows)
        return out
