"""Image to text through the language model (issue 27): the ClipCap captioner trained by
configs/captioners/shapes-smollm2.toml beside the shipped from-scratch `shapes` captioner, on
the same held-out single-object renders, and its free-form captions of scenes it never saw.

    limner train configs/captioners/shapes-smollm2.toml
    python benchmarks/llm_captioner.py runs/captioner-shapes-smollm2/captioner
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "llm-captioner"


def rereading(model, images) -> list[str]:
    """The ClipCap captioner's greedy captions written the way before its key-value cache: the
    whole sequence (start, prefix, tokens so far) run again for each token. The cached way's
    reference (tests/test_llama.py) and the anchor of its speed row."""
    import torch

    with torch.no_grad():
        prefix, rows, done = model.prefix(images), [[] for _ in images], [False] * len(images)
        for _ in range(model.max_tokens):
            step = model._run(prefix, rows)
            ends = torch.tensor([prefix.shape[1] + len(r) for r in rows])
            for i, t in enumerate(step[torch.arange(len(rows)), ends].argmax(-1).tolist()):
                done[i] = done[i] or t == model.llm.eos
                if not done[i]:
                    rows[i].append(t)
            if all(done):
                break
    return [model.llm.tokenizer.decode(r).strip() for r in rows]


def main() -> None:
    import limner
    from limner.files import write_text_atomic

    sys.path.insert(0, str(HERE))
    from captioners import items, per_attribute  # the shipped captioners' scoring, not a copy

    folder = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "--render":  # the table again from the JSON
        write_text_atomic(OUT.with_suffix(".md"), render(json.loads(OUT.with_suffix(".json").read_text()), folder))
        return
    n = 200
    images, truths = items("shapes", size=32, split="test", max_objects=1, length=n)
    two, two_truths = items("shapes", size=32, split="test", max_objects=2, min_objects=2, length=6)
    meta = json.loads((folder / "captioner.json").read_text())
    rows = []
    for name, model in (("shapes (show-attend-tell, from scratch)", "shapes"), ("SmolLM2 prefix (ClipCap)", folder)):
        captioner = limner.load_captioner(model)
        start = time.perf_counter()
        said = captioner.caption(images)
        seconds = (time.perf_counter() - start) / n
        exact = sum(a.strip() == b for a, b in zip(said, truths)) / n
        before = {}
        if model == folder:  # the way before the key-value cache, same weights and images, in batches of 64
            start = time.perf_counter()
            again = [c for i in range(0, n, 64) for c in rereading(captioner, images[i:i + 64])]
            before = {"ms_per_image_rereading": round(1000 * (time.perf_counter() - start) / n, 1),
                      "rereading_same_captions": again == said}
        rows.append({"captioner": name, "exact": round(exact, 4), **per_attribute(said, truths),
                     "ms_per_image": round(1000 * seconds, 1), **before,
                     "examples": [[t, s] for t, s in zip(truths[:4], said[:4])],
                     "unseen": [[t, s] for t, s in zip(two_truths, captioner.caption(two))]})
        print(rows[-1], flush=True)
    from limner.bench import cpu_name

    cpu = cpu_name()
    data = {"cpu": cpu, "date": time.strftime("%Y-%m-%d"), "held_out": n, "training": meta.get("scores", {}),
            "rows": rows}
    write_text_atomic(OUT.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    write_text_atomic(OUT.with_suffix(".md"), render(data, folder))


def render(data: dict, folder: Path) -> str:
    train, n, rows = data["training"], data["held_out"], data["rows"]
    lines = ["# Image to text through SmolLM2 (ClipCap) beside the from-scratch captioner (issue 27)", "",
             f"{n} held-out single-object renders (test split); exact: the caption equals the truth; per attribute: "
             "found by its colour as the shapes scorer does. The ClipCap captioner: a CNN prefix of 16 embeddings, the "
             f"frozen SmolLM2-135M writes; {train.get('steps')} steps, {train.get('cpu_minutes')} CPU min "
             f"(configs/captioners/shapes-smollm2.toml). {data['cpu']}, {data['date']}. "
             f"`python benchmarks/llm_captioner.py {folder}`.", "",
             "| captioner | exact | size | colour | shape | place | ms/image |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['captioner']} | {r['exact']:.1%} | {r['size']:.1%} | {r['colour']:.1%} | "
                     f"{r['shape']:.1%} | {r['position']:.1%} | {r['ms_per_image']} |")
    for r in rows:
        if "ms_per_image_rereading" in r:
            lines += ["", f"ms/image: the ClipCap captioner reads its prefix once and then each written token alone "
                      f"against the language model's key-value cache; written the way before it (the whole sequence "
                      f"run again for each token, `rereading` in the script, same weights and images): "
                      f"{r['ms_per_image_rereading']} ms/image, {r['ms_per_image_rereading'] / r['ms_per_image']:.1f}x "
                      f"the time, captions {'the same' if r['rereading_same_captions'] else 'NOT the same'}."]
    for r in rows:
        lines += ["", f"{r['captioner']}, held-out (truth -> caption): "
                  + "; ".join(f"{t!r} -> {s!r}" for t, s in r["examples"]),
                  "", f"{r['captioner']}, two-object scenes, free-form (the shipped `shapes` captioner was trained on "
                  "one- and two-object scenes, the ClipCap one on single objects only): "
                  + "; ".join(f"{t!r} -> {s!r}" for t, s in r["unseen"])]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
