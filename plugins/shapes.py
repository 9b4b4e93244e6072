"""`shapes`: a seeded, procedurally drawn, captioned dataset, the `shapes_attributes` metric
that tells whether a generated image shows the colours, shapes and positions its prompt asked
for, and the `shapes_reader` text encoder, for which frozen language models read a prompt in
other words into the captions' grammar.

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
from limner.text_cache import FrozenStaysEval, weights_from_factory

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


# ---- reading prompts in other words into the grammar (issue 27) ----

QUESTIONS = {"colour": "Colour:", "shape": "Shape:", "row": "Height (top, middle or bottom):",
             "column": "Side (left, middle or right):"}
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "row": list(ROWS), "column": list(COLUMNS)}
WAY_OPTIONS = {"model", "way", "examples", "calibrated", "layer"}
# chosen on the dev phrasings (benchmarks/reader_ways.py): held-out colour 90%, shape 91%, place 58.5%
_GEMMA = "gemma3_270m"
DEFAULT_WAYS = {"colour": {"way": "vote", "ways": [  # the best eleven colour ways on dev, best first
                    {"model": _GEMMA, "way": "ask", "examples": 8, "calibrated": True},
                    {"model": _GEMMA, "way": "ask", "examples": 4, "calibrated": True},
                    {"model": _GEMMA, "way": "ask", "examples": 8, "calibrated": False},
                    {"model": _GEMMA, "way": "ask", "examples": 0, "calibrated": True},
                    {"model": _GEMMA, "way": "ask", "examples": 0, "calibrated": False},
                    {"model": _GEMMA, "way": "nearest", "layer": 4},
                    {"model": "smollm2", "way": "ask", "examples": 0, "calibrated": True},
                    {"model": _GEMMA, "way": "ask", "examples": 4, "calibrated": False},
                    {"model": "mpnet", "way": "nearest", "layer": 1},
                    {"model": "mpnet", "way": "nearest", "layer": 0},
                    {"model": _GEMMA, "way": "nearest", "layer": 5}]},
                "shape": {"way": "vote", "ways": [  # the best nine shape ways on dev, best first
                    {"model": "smollm2", "way": "ask", "examples": 4, "calibrated": False},
                    {"model": "smollm2", "way": "ask", "examples": 8, "calibrated": True},
                    {"model": "mpnet", "way": "nearest", "layer": 3},
                    {"model": "mpnet", "way": "nearest", "layer": 4},
                    {"model": "mpnet", "way": "nearest", "layer": 11},
                    {"model": "smollm2", "way": "ask", "examples": 4, "calibrated": True},
                    {"model": "mpnet", "way": "nearest", "layer": 10},
                    {"model": "smollm2", "way": "ask", "examples": 8, "calibrated": False},
                    {"model": "mpnet", "way": "nearest", "layer": 5}]},
                "place": {"model": "smollm2", "way": "nearest", "layer": 1}}


def place_of(row: str, column: str) -> str:
    """The grid position a height (ROWS) and a side (COLUMNS) name: ("top", "left") -> "top left"."""
    return next(p for p, cell in POSITIONS.items() if cell == (ROWS.index(row), COLUMNS.index(column)))


def one_object_captions() -> list[str]:
    """Every one-object caption the grammar says (486: sizes x colours x shapes x places)."""
    return [ShapeObject(z, c, s, p).phrase() for z in SIZES for c in COLOURS for s in SHAPES for p in POSITIONS]


def answers(caption_text: str) -> dict[str, str]:
    """The colour, shape, row and column a one-object caption says."""
    (o,) = parse_caption(caption_text)
    row, column = POSITIONS[o.position]
    return {"colour": o.colour, "shape": o.shape, "row": ROWS[row], "column": COLUMNS[column]}


def worked_examples(n: int) -> list[str]:
    """n seeded random one-object captions (the first k are the same for every n >= k)."""
    import random

    rng = random.Random(0)
    return [ShapeObject("", rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))).phrase()
            for _ in range(n)]


def question(text: str, key: str, examples: list[str]) -> str:
    """'Picture: {text}\\nColour:' (key one of QUESTIONS), after the worked examples with their answers."""
    worked = "".join(f"Picture: {e}\n{QUESTIONS[key]} {answers(e)[key]}\n\n" for e in examples)
    return f"{worked}Picture: {text}\n{QUESTIONS[key]}"


def nearest_caption(train: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[int]:
    """Each prompt's best caption of `train` by BERTScore F1 (Zhang et al. 2020: each token's best
    cosine match in the other text, averaged both ways) over token states [n_i, D], after removing
    the mean of `train`'s tokens."""
    import torch.nn.functional as F

    centre = torch.cat(train).mean(0)
    tokens = F.normalize(torch.cat(train) - centre, dim=-1)
    device = tokens.device
    owner = torch.cat([torch.full((len(t),), i, device=device) for i, t in enumerate(train)])
    count = torch.bincount(owner, minlength=len(train)).float()
    picks = []
    for p in prompts:
        if len(p) == 0:
            raise limner.LimnerError("nearest_caption: a prompt with no tokens")
        sim = F.normalize(p - centre, dim=-1) @ tokens.T  # [prompt tokens, all training tokens]
        best = torch.full((len(p), len(train)), -2.0, device=device).scatter_reduce(1, owner.expand(len(p), -1),
                                                                                     sim, "amax")
        recall = best.mean(0)
        precision = torch.zeros(len(train), device=device).scatter_add(0, owner, sim.max(0).values) / count
        picks.append(int((2 * recall * precision / (recall + precision)).argmax()))
    return picks


def vote(said: list[list[str]]) -> list[str]:
    """Per text, the answer most of the ways (each a list of answers, one per text) give; of those
    tied, the earliest way's."""
    from collections import Counter

    out = []
    for given in zip(*said):
        count = Counter(given)
        most = max(count.values())
        out.append(next(a for a in given if count[a] == most))
    return out


def in_grammar(prompt: str) -> bool:
    try:
        parse_caption(prompt)
    except limner.LimnerError:
        return False
    return True


class ShapesReader(FrozenStaysEval, torch.nn.Module):
    """A text encoder for shapes prompts in any words: frozen language models read a prompt's colour,
    shape and place (each the way `ways` says), the caption that says them in the grammar is written,
    and `encoder` encodes it; an empty prompt or one already in the grammar is encoded as it is. Ways:
    `ask` (the model answers 'Picture: {prompt}\\nColour:' after `examples` worked examples, the
    training word whose first token is likeliest next; `calibrated`: less its scores after 'N/A',
    Zhao et al. 2021; a place asked as its height and its side), `nearest` (the place, colour or
    shape of the one-object caption nearest by BERTScore over the model's states at `layer`; a
    sentence encoder, minilm or mpnet, serves here too) or `vote` (the answer most of its listed
    ways give; a tie goes to the earliest-listed way's)."""

    def __init__(self, encoder: dict, ways: dict[str, dict]):
        super().__init__()
        self.encoder = limner.create("text_encoders", **_component("encoder", encoder))
        self.dim, self.ways, self.layers, models = self.encoder.dim, {}, {}, {}
        self.readers = torch.nn.ModuleList()

        def placed(key: str, way: dict) -> dict:  # the way with its model's index in self.readers
            if way["way"] == "vote":
                return {**way, "ways": [placed(f"{key}.ways[{i}]", w) for i, w in enumerate(way["ways"])]}
            model = _component(f"{key}.model", way["model"])
            name = repr(sorted(model.items()))
            if name not in models:
                models[name] = len(self.readers)
                self.readers.append(limner.create("text_encoders", **model))
            reader = self.readers[models[name]]
            if way["way"] == "ask" and not hasattr(reader, "next_token_log_probs"):
                raise limner.LimnerError(f"{key}.model {way['model']!r} is not a language model limner can ask "
                                         "(way = \"ask\": one of smollm2, gemma3_270m, gguf_llm)")
            if way["way"] == "nearest" and not hasattr(reader, "token_states"):
                raise limner.LimnerError(f"{key}.model {way['model']!r} gives no token states to find the nearest "
                                         "caption by (way = \"nearest\": one of smollm2, gemma3_270m, gguf_llm, "
                                         "minilm, mpnet)")
            if way["way"] == "nearest":
                reader.token_states([], [way["layer"]])  # a bad layer named now, not at first use
                self.layers.setdefault(models[name], set()).add(way["layer"])
            return {**way, "reader": models[name]}

        for key, way in ways.items():
            self.ways[key] = placed(key, way)
        self.layers = {i: sorted(layers) for i, layers in self.layers.items()}  # per model: the layers nearest reads
        self._known: dict = {}  # per model: the calibration scores and the captions' states, made at first use
        weights_from_factory(self)  # frozen readers and encoder: out of checkpoints (a trained encoder stays in)

    def _ask(self, key: str, texts: list[str], way: dict, seen: dict) -> list[str]:
        reader, examples = self.readers[way["reader"]], worked_examples(way["examples"])
        tag = (key, way["reader"], way["examples"])  # raw and calibrated ways share one reading
        if tag not in seen:
            seen[tag] = reader.next_token_log_probs([question(t, key, examples) for t in texts], ANSWERS[key])
        scores = seen[tag]
        if way["calibrated"]:  # the content-free answer's scores, once per model, question and examples
            if ("null", *tag) not in self._known:
                self._known[("null", *tag)] = reader.next_token_log_probs([question("N/A", key, examples)],
                                                                          ANSWERS[key])
            scores = scores - self._known[("null", *tag)]
        return [ANSWERS[key][i] for i in scores.argmax(-1).tolist()]

    def _nearest(self, key: str, texts: list[str], way: dict, seen: dict) -> list[str]:
        i, layers = way["reader"], self.layers[way["reader"]]  # every layer this model's ways read, one forward
        if ("captions", i) not in self._known:
            captions = one_object_captions()
            self._known[("captions", i)] = captions, self.readers[i].token_states(captions, layers)
        if ("states", i) not in seen:
            seen[("states", i)] = self.readers[i].token_states(texts, layers)
        if ("picked", i, way["layer"]) not in seen:  # one nearest caption per layer for every attribute
            captions, states = self._known[("captions", i)]
            at = layers.index(way["layer"])
            seen[("picked", i, way["layer"])] = [parse_caption(captions[j])[0] for j in
                                                 nearest_caption(states[at], seen[("states", i)][at])]
        return [getattr(o, "position" if key == "place" else key) for o in seen[("picked", i, way["layer"])]]

    def answer(self, key: str, texts: list[str], way: dict, seen: dict) -> list[str]:
        """Each text's `key` (colour, shape or place) read `way` (one of self.ways or a way listed in
        one of them); `seen`, empty for new texts, keeps the readings other ways of these texts share."""
        if way["way"] == "vote":
            return vote([self.answer(key, texts, w, seen) for w in way["ways"]])
        if way["way"] == "nearest":
            return self._nearest(key, texts, way, seen)
        if key != "place":
            return self._ask(key, texts, way, seen)
        rows, columns = self._ask("row", texts, way, seen), self._ask("column", texts, way, seen)
        return [place_of(r, c) for r, c in zip(rows, columns)]

    def read(self, prompts: list[str]) -> list[str]:
        """Each prompt as the grammar says it: 'a crimson disc in the upper left corner' -> 'a red
        circle at the top left' (as right as the models read it); one in the grammar, or empty, unchanged."""
        from limner.errors import notice
        from limner.protocols import check_prompts, prompt_truncated

        out = check_prompts(prompts)
        todo = [i for i, p in enumerate(out) if p.strip() and not in_grammar(p)]
        if not todo:
            return out
        texts = [" ".join(out[i].split()) for i in todo]
        long = [out[i] for i, t in zip(todo, texts) if len(t) > MAX_READ]
        texts = [t[:MAX_READ] for t in texts]
        if long:
            prompt_truncated(long[0], MAX_READ, "characters")
        seen: dict = {}
        said = {key: self.answer(key, texts, self.ways[key], seen) for key in ("colour", "shape", "place")}
        for j, i in enumerate(todo):
            out[i] = f"a {said['colour'][j]} {said['shape'][j]} at the {said['place'][j]}"
        shown = "; ".join(f"{prompts[i]!r:.80} as {out[i]!r}" for i in todo[:3])
        notice(f"shapes_reader read {shown}" + (f" (and {len(todo) - 3} more)" if len(todo) > 3 else ""))
        return out

    def encode(self, prompts):
        return self.encoder.encode(self.read(prompts))


MAX_READ = 300  # characters of a prompt the readers see


def _component(what: str, value) -> dict:
    """A component given by name ("smollm2") or as a table ({name = "gguf_llm", path = "..."})."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise limner.LimnerError(f"{what} must be a text encoder's name or a table with its name, e.g. \"smollm2\" or "
                             f"{{name = \"minilm\"}}, got {value!r}")


def _way(key: str, given, voted: bool = False) -> dict:
    """The way table `given` for attribute `key`, checked, with its defaults filled in."""
    if not isinstance(given, dict):
        raise limner.LimnerError(f"{key} must be a table of {', '.join(sorted(WAY_OPTIONS))} (or of way = \"vote\" "
                                 f"and ways), e.g. {{model = \"smollm2\", way = \"ask\", examples = 4}}, got {given!r}")
    way = dict(given)
    if way.get("way") == "vote" and not voted:
        ways = way.get("ways")
        if set(way) != {"way", "ways"} or not isinstance(ways, list) or not ways:
            raise limner.LimnerError(f"{key}: way = \"vote\" takes ways, a list of one or more ask or nearest ways "
                                     f"(tables) and nothing else, got {given!r}")
        return {"way": "vote", "ways": [_way(f"{key}.ways[{i}]", w, True) for i, w in enumerate(ways)]}
    unknown = sorted(set(way) - WAY_OPTIONS)
    if unknown or "model" not in way or way.get("way") not in ("ask", "nearest"):
        raise limner.LimnerError(
            f"{key} = {given!r}: a way is a table of model (a language model: smollm2, gemma3_270m, gguf_llm; for "
            f"nearest also a sentence encoder: minilm, mpnet), "
            f"way (\"ask\" or \"nearest\"), and for ask examples (worked examples, 0 to 16) and calibrated (true "
            f"or false), for nearest layer (a layer number)"
            + ("; or way = \"vote\" with ways, a list of such tables" if not voted else
               "; a vote lists ask and nearest ways only")
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if way["way"] == "ask":
        way = {"examples": 0, "calibrated": False, **way}
        n, calibrated = way["examples"], way["calibrated"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 16 or not isinstance(calibrated, bool):
            raise limner.LimnerError(f"{key}: examples must be a whole number 0 to 16 and calibrated true or "
                                     f"false, got examples = {n!r}, calibrated = {calibrated!r}")
        if "layer" in way:
            raise limner.LimnerError(f"{key}: layer is for way = \"nearest\" (way = \"ask\" reads the last layer)")
    elif "layer" not in way or {"examples", "calibrated"} & set(way):
        raise limner.LimnerError(f"{key}: way = \"nearest\" takes a layer (a layer number) and no examples or "
                                 f"calibrated, got {given!r}")
    return way


def shapes_reader(encoder: dict | str, colour: dict | None = None, shape: dict | None = None,
                  place: dict | None = None) -> ShapesReader:
    """Prompts in any words read into the shapes grammar by frozen language models, then encoded."""
    ways = {key: _way(key, DEFAULT_WAYS[key] if given is None else given)
            for key, given in (("colour", colour), ("shape", shape), ("place", place))}
    return ShapesReader(encoder, ways)
