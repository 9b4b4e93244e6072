"""Do a model's prompts work in words its training captions never used? (issue 27)

Each of the 200 held-out phrasings (benchmarks/heldout-phrasings.json, written once by
benchmarks/phrasings.py) is drawn with seed k and scored by `shapes_attributes` against the
caption it means; the same 200 objects said in the training grammar (seed k too) give the
in-grammar score beside it, and the 200 dev phrasings (benchmarks/dev-phrasings.json: other words
again) the dev score, the one models are chosen on. One row per model, added to the results file
(an added model's old row is replaced in its place, its note kept unless another is given):

    python benchmarks/heldout_phrasings.py --add checkpoints/shapes-unet --encoder minilm --note "shipped demo"
    python benchmarks/heldout_phrasings.py     # re-render benchmarks/results/heldout-phrasings.md
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "heldout-phrasings"
KEYS = ("colour", "shape", "position", "all")


def score(path: Path, batch: int = 50) -> dict:
    import torch

    import limner

    held, dev = (json.loads((HERE / f"{name}-phrasings.json").read_text()) for name in ("heldout", "dev"))
    pipe = limner.load_pipeline(path, device="cpu")
    scorer = limner.create("metrics", "shapes_attributes")
    out = {}
    for side, rows, key in (("heldout", held, "prompt"), ("grammar", held, "means"), ("dev", dev, "prompt")):
        prompts = [r[key] for r in rows]
        start = time.perf_counter()
        images = torch.cat([pipe.generate(prompts[i: i + batch], seed=list(range(i, min(i + batch, len(prompts)))))
                            for i in range(0, len(prompts), batch)])
        result = scorer(images, [r["means"] for r in rows])
        out[side] = {k: round(float(result[k]), 3) for k in KEYS}
        out[side]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{path}: {side} {out[side]}", flush=True)
    return out


def percent(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def render(data: dict) -> str:
    lines = ["# Prompts in words the training captions never used (issue 27)", "",
             "200 one-object prompts in other words and sentence frames (benchmarks/heldout-phrasings.json, e.g. "
             "\"there is a cobalt three-sided shape up in the top-left corner\"), each drawn with seed k and scored "
             "by `shapes_attributes` against the caption it means; \"in grammar\": the same 200 objects said as the "
             "training captions say them; \"dev\": the 200 dev phrasings (benchmarks/dev-phrasings.json, other "
             "words again), on which models are chosen (rows added before 2026-12-07 were not scored on them). "
             "The scorer finds an object by its colour, so shape and position count "
             "only where the colour came out (chance: colour 17%, shape and position lower than 33% and 11%). "
             f"Rows: `python benchmarks/heldout_phrasings.py --add RUN ...`; scored on {data['cpu']} unless a "
             "row's note names another CPU.", "",
             "| model | text encoder | held-out colour | shape | position | all three | in grammar: colour | shape "
             "| position | all three | dev: colour | shape | position | all three | note |",
             "|---|---|" + "---:|" * 12 + "---|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['encoder']} | " + " | ".join(
            percent(r.get(side, {}).get(k)) for side in ("heldout", "grammar", "dev") for k in KEYS)
            + f" | {r.get('note', '')}"
                     + (f" (scored on {r['cpu']})" if r.get("cpu", data["cpu"]) != data["cpu"] else "") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from limner.files import write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=Path, help="a run or checkpoint folder to score and add (or replace)")
    parser.add_argument("--encoder", default="", help="its text encoder, as the table shows it")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    path = RESULTS.with_suffix(".json")
    from limner.bench import cpu_name

    cpu = cpu_name()
    data = json.loads(path.read_text()) if path.exists() else {"cpu": cpu, "rows": []}
    if args.add:
        old = next((r for r in data["rows"] if r["model"] == str(args.add)), {})
        row = {"model": str(args.add), "encoder": args.encoder or old.get("encoder", ""),
               "note": args.note or old.get("note", ""), "date": time.strftime("%Y-%m-%d"),
               "cpu": cpu, **score(args.add)}
        data["rows"] = ([row if r is old else r for r in data["rows"]] if old else data["rows"] + [row])
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    write_text_atomic(RESULTS.with_suffix(".md"), render(data))


if __name__ == "__main__":
    main()
