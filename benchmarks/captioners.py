"""How well the shipped captioners read held-out images: benchmarks/results/captioners.{json,md}.

    python benchmarks/captioners.py

- `shapes` on single-object renders of the test split: exact caption (size, colour, shape and
  place all right), and on two-object scenes: each attribute of each object (objects matched by
  colour, as the shapes scorer does), exact caption (both clauses, any order).
- `fashion_mnist` on the 10,000 test images: the class word right, and the exact caption
  (which also needs the template the item happened to be captioned with: 1 in 3 by chance).
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import limner
from limner.plugins.shapes import parse_caption

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "captioners.json"


def items(name: str, **options) -> tuple[torch.Tensor, list[str]]:
    data = limner.create("datasets", name, **options)
    pairs = [data[i] for i in range(len(data))]
    return torch.stack([image for image, _ in pairs]), [text for _, text in pairs]


def per_attribute(captions: list[str], truths: list[str]) -> dict[str, float]:
    """Fractions of true objects whose size / colour / shape / place the caption gets right
    (an object is found by its colour; an unreadable caption gets nothing right)."""
    counts = {"size": 0, "colour": 0, "shape": 0, "position": 0, "all": 0}
    total = 0
    for text, truth in zip(captions, truths):
        try:
            said = {o.colour: o for o in parse_caption(text)}
        except limner.LimnerError:
            said = {}
        for obj in parse_caption(truth):
            total += 1
            got = said.get(obj.colour)
            if got is None:
                continue
            right = {"size": got.size == obj.size, "colour": True, "shape": got.shape == obj.shape,
                     "position": got.position == obj.position}
            for key, ok in right.items():
                counts[key] += ok
            counts["all"] += all(right.values())
    return {key: value / total for key, value in counts.items()} | {"objects": total}


def main() -> dict:
    from limner.plugins.captioners import agreement

    torch.set_num_threads(2)
    rows = {}
    shapes = limner.create("captioners", "shapes")
    for label, options, n in (
        ("one object", {"max_objects": 1}, 1000),
        ("two objects", {"min_objects": 2, "max_objects": 2}, 500),
    ):
        images, truths = items("shapes", size=32, split="test", length=n, **options)
        start = time.perf_counter()
        said = shapes.caption(images)
        seconds = time.perf_counter() - start
        rows[f"shapes, {label}"] = {"images": n, **agreement(said, truths), "attributes": per_attribute(said, truths),
                                    "ms_per_image": 1e3 * seconds / n, "examples": list(zip(truths[:3], said[:3]))}
    fashion = limner.create("captioners", "fashion_mnist")
    images, truths = items("fashion_mnist", size=28, channels=1, split="test")
    start = time.perf_counter()
    said = fashion.caption(images)
    seconds = time.perf_counter() - start
    rows["fashion_mnist, test split"] = {
        "images": len(images),
        "class_word": agreement(said, truths, fashion.classes)["caption_agreement"],
        **agreement(said, truths),
        "ms_per_image": 1e3 * seconds / len(images),
        "examples": list(zip(truths[:3], said[:3])),
    }
    data = {
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": 2,
        "training": {"shapes": shapes.scores, "fashion_mnist": fashion.scores},
        "rows": rows,
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(render(data))
    return data


def render(data: dict) -> str:
    lines = [
        f"The shipped captioners on held-out images (`python benchmarks/captioners.py`, {data['datetime']}, "
        "2 CPU threads). Exact: the caption equals the truth (clauses in any order). Shapes attributes: per "
        "true object, found by its colour.",
        "",
        "| captioner, images | n | exact | clause F1 | class word | size | colour | shape | place | all four "
        "| ms/image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in data["rows"].items():
        a = r.get("attributes", {})
        cells = [f"{100 * r['caption_agreement']:.1f}%", f"{r['caption_clause_f1']:.3f}",
                 f"{100 * r['class_word']:.1f}%" if "class_word" in r else "-",
                 *(f"{100 * a[k]:.1f}%" if a else "-" for k in ("size", "colour", "shape", "position", "all"))]
        lines.append(f"| {name} | {r['images']} | " + " | ".join(cells) + f" | {r['ms_per_image']:.2f} |")
    lines += [
        "",
        "Training of the shipped folders (from each one's captioner.json; trained by the hand-written loop "
        "of 2026-11-24, which `limner train configs/captioners/<name>.toml`, the `captioner` recipe on the one "
        "loop, replaced on 2026-12-05: its retrained scores are in retrained-on-the-loop.md):",
        "",
        "| captioner | steps | CPU minutes | held-out exact | class word |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in data["training"].items():
        word = f"{100 * s['class_word']:.1f}%" if "class_word" in s else "-"
        lines.append(
            f"| {name} | {s.get('steps')} | {s.get('cpu_minutes')} | {100 * s.get('exact_match', 0):.1f}% | {word} |"
        )
    lines += ["", "Examples (truth -> caption):", ""]
    for name, r in data["rows"].items():
        lines += [f"- {name}: " + "; ".join(f"'{t}' -> '{c}'" for t, c in r["examples"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(main()["rows"], indent=1), file=sys.stdout)
