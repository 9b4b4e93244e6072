"""The held-out phrasings (issue 27): one-object shapes prompts in words and sentence frames the
training captions never use, each with the caption it means, so that the shapes scorer can
judge an image drawn from the paraphrase. Written once (seed 27), committed as
benchmarks/heldout-phrasings.json, never trained on or tuned against.

A second, disjoint set - other words again, other frames (`DEV_*`, seed 28,
benchmarks/dev-phrasings.json) - is the one choices are made on (which layer, which template:
benchmarks/encoder_probe.py); the held-out set only measures what was chosen.

The training captions are `a [small|large] <colour> <shape> at the <position>` with the colours
red, green, blue, yellow, purple, white, the shapes circle, square, triangle and nine places
(plugins/shapes.py). Here no colour or shape word of theirs appears: other words name them
(crimson, cobalt, disc, box, pyramid, ...); the places are said in other words and frames
("in the upper left corner", "near the bottom", "halfway down the right edge"), some of which
share "left", "right", "top" or "bottom" with the training captions, as people say them.
These lists are the evaluation's only: training never reads them.

    python benchmarks/phrasings.py    # rewrites both files (same seeds: same files)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

COLOURS = {
    "red": ["crimson", "scarlet", "ruby", "cherry"],
    "green": ["emerald", "jade", "lime", "leafy"],
    "blue": ["azure", "cobalt", "sapphire", "navy"],
    "yellow": ["golden", "lemon", "canary", "mustard"],
    "purple": ["violet", "plum", "amethyst", "lavender"],
    "white": ["snowy", "ivory", "pearl", "chalky"],
}
SHAPES = {
    "circle": ["disc", "dot", "ball", "round blob"],
    "square": ["box", "block", "tile", "cube"],
    "triangle": ["pyramid", "wedge", "arrowhead", "three-sided shape"],
}
PLACES = {
    "top left": ["in the upper left corner", "in the northwest corner", "up in the top-left corner"],
    "top": ["near the top edge", "in the upper middle", "up high, centred"],
    "top right": ["in the upper right corner", "in the northeast corner", "up in the top-right corner"],
    "left": ["halfway down the left edge", "on the left side, middle height", "at the west edge"],
    "center": ["in the middle", "in the very centre", "dead centre"],
    "right": ["halfway down the right edge", "on the right side, middle height", "at the east edge"],
    "bottom left": ["in the lower left corner", "in the southwest corner", "down in the bottom-left corner"],
    "bottom": ["near the bottom edge", "in the lower middle", "down low, centred"],
    "bottom right": ["in the lower right corner", "in the southeast corner", "down in the bottom-right corner"],
}
FRAMES = [
    "{article} {colour} {shape} {place}",
    "there is {article} {colour} {shape} {place}",
    "{Place}: {article} {colour} {shape}",
    "draw {article} {colour} {shape} {place}",
    "{article} {shape} coloured {colour}, {place}",
    "one {colour} {shape}, placed {place}",
    "picture {article} {colour} {shape} sitting {place}",
    "{place} you can see {article} {colour} {shape}",
]


DEV_COLOURS = {
    "red": ["vermilion", "cardinal", "tomato"],
    "green": ["mint", "forest", "clover"],
    "blue": ["cerulean", "denim", "ocean"],
    "yellow": ["saffron", "sunflower", "banana"],
    "purple": ["grape", "orchid", "lilac"],
    "white": ["milky", "frost", "cream"],
}
DEV_SHAPES = {
    "circle": ["coin", "round spot", "wheel"],
    "square": ["crate", "die", "tablet"],
    "triangle": ["cone", "tent", "delta"],
}
DEV_PLACES = {
    "top left": ["high up on the left", "at the upper-left"],
    "top": ["at the top centre", "along the upper border"],
    "top right": ["high up on the right", "at the upper-right"],
    "left": ["at the middle left", "on the far left, centred vertically"],
    "center": ["at the midpoint", "at the heart of the picture"],
    "right": ["at the middle right", "on the far right, centred vertically"],
    "bottom left": ["low on the left", "at the lower-left"],
    "bottom": ["at the bottom centre", "along the lower border"],
    "bottom right": ["low on the right", "at the lower-right"],
}
DEV_FRAMES = [
    "{article} {colour} {shape} can be seen {place}",
    "show me {article} {colour} {shape} {place}",
    "{Place} there is {article} {colour} {shape}",
    "make {article} {colour} {shape}, {place}",
]


def phrasings(n: int = 200, seed: int = 27, words=(COLOURS, SHAPES, PLACES, FRAMES)) -> list[dict]:
    colours, shapes, places, frames = words
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour, shape, place = rng.choice(list(colours)), rng.choice(list(shapes)), rng.choice(list(places))
        frame = rng.choice(frames)
        c, s, p = rng.choice(colours[colour]), rng.choice(shapes[shape]), rng.choice(places[place])
        first = s if frame.startswith("{article} {shape}") else c
        prompt = frame.format(article="an" if first[0] in "aeiou" else "a", colour=c, shape=s, place=p,
                              Place=p[0].upper() + p[1:])
        rows.append({"prompt": prompt, "means": f"a {colour} {shape} at the {place}"})
    return rows


if __name__ == "__main__":
    for name, rows in (("heldout", phrasings()), ("dev", phrasings(200, 28, (DEV_COLOURS, DEV_SHAPES, DEV_PLACES,
                                                                              DEV_FRAMES)))):
        (HERE / f"{name}-phrasings.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {HERE / f'{name}-phrasings.json'}")
