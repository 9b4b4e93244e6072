"""Which way of reading a prompt in other words (issue 27) each language model answers best, per
attribute, chosen on the dev phrasings and measured on the held-out ones: the ways
`shapes_reader` (plugins/shapes.py) takes, so that the chosen ones are its defaults.

For SmolLM2, Gemma 3 270M and the sentence encoder all-mpnet-base-v2 (MPNet: `nearest` only, it
answers no questions), each colour, shape and place is read from the 200 dev and 200 held-out
prompts (benchmarks/phrasings.py) in every way the reader offers:

- `ask` with 0, 4 or 8 worked examples (one-object captions), raw or calibrated: the model
  answers 'Picture: {prompt}\\nColour:' ('Shape:'; a place as its height and its side, both
  right to count) with the training word whose first token it finds likeliest next;
- `nearest` at every layer: the attribute of the one-object caption (486) nearest by BERTScore
  over the model's token states at that layer.

- `vote` of the best k (3, 5, 7, 9, 11) ways of an attribute on dev: the answer most of them
  give, a tie going to the better dev way's.

The way with the best dev score is chosen per attribute (any model; one way before a vote, a
smaller vote before a larger, where they tie), and `shapes_reader` with those ways reads every
dev and held-out prompt whole: its colour, shape and place, each scored against the caption the
prompt means, and all three together (what the in-grammar model draws from its captions: the
shipped demo draws 99.5-100% of them right); its place is also scored per place phrase, to show
which phrases it cannot read. Chance: colour 17%, shape 33%, place 11%.

    python benchmarks/reader_ways.py benchmarks/results/reader-ways.json   # ~30 min alone on 2 cores
    python benchmarks/reader_ways.py --render benchmarks/results/reader-ways.json  # the .md again
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
KEYS = ("colour", "shape", "place")
VOTES = (3, 5, 7, 9, 11)  # how many of an attribute's best dev ways vote
MODELS = ("smollm2", "gemma3_270m", "mpnet")


def splits() -> dict:
    """name -> (prompts, [{"colour", "shape", "place"}]) for the dev and held-out phrasings."""
    from limner.plugins.shapes import parse_caption

    out = {}
    for name in ("dev", "heldout"):
        rows = json.loads((HERE / f"{name}-phrasings.json").read_text())
        truth = [parse_caption(r["means"])[0] for r in rows]
        out[name] = [r["prompt"] for r in rows], [{"colour": o.colour, "shape": o.shape, "place": o.position}
                                                  for o in truth]
    return out


def ways_of(model: str, data: dict) -> list[dict]:
    """Every way's answers of `model`: [{"way": {...}, "answers": {split: {key: [answer per prompt]}}}],
    read by a shapes_reader that lists them all (one forward per question and examples, one for
    every nearest layer)."""
    import limner

    enc = limner.create("text_encoders", model)
    asks = hasattr(enc, "next_token_log_probs")  # a sentence encoder (mpnet) is read the nearest way only
    layers = len(enc.model.blk) if asks else len(enc.model.encoder.layer)
    ways = [{"model": model, "way": "ask", "examples": k, "calibrated": c} for k in (0, 4, 8) for c in (False, True)
            if asks]
    ways += [{"model": model, "way": "nearest", "layer": layer} for layer in range(layers + 1)]
    every = {"way": "vote", "ways": ways}
    reader = limner.create("text_encoders", "shapes_reader", encoder="minilm", colour=every, shape=every, place=every)
    out = [{"way": w, "answers": {split: {} for split in data}} for w in ways]
    for split, (prompts, _) in data.items():
        seen: dict = {}
        for key in KEYS:
            for o, w in zip(out, reader.ways[key]["ways"]):
                o["answers"][split][key] = reader.answer(key, prompts, w, seen)
            print(f"{model}: {split} {key} read every way", flush=True)
    return out


def place_phrases(split: str, prompts: list[str], truth: list[dict], places: list[str]) -> list[dict]:
    """The reader's place per place phrase of the split (benchmarks/phrasings.py): how often it is
    read right and what it is read as most often when wrong."""
    from collections import Counter

    from phrasings import DEV_PLACES, PLACES

    said = {a: place for place, alts in (DEV_PLACES if split == "dev" else PLACES).items() for a in alts}
    rows = {}
    for prompt, t, place in zip(prompts, truth, places):
        phrase = max((a for a in said if a in prompt.lower()), key=len)
        row = rows.setdefault(phrase, {"split": split, "phrase": phrase, "means": said[phrase], "prompts": 0,
                                       "right": 0, "wrong": Counter()})
        row["prompts"] += 1
        row["right"] += place == t["place"]
        row["wrong"][place] += place != t["place"]
    return [{**r, "wrong": dict(+r["wrong"])} for r in sorted(rows.values(), key=lambda r: r["right"] / r["prompts"])]


def score(answers: list[str], truth: list[dict], key: str) -> float:
    return sum(a == t[key] for a, t in zip(answers, truth)) / len(truth)


def run(out: Path) -> dict:
    import limner
    from limner.bench import cpu_name
    from limner.plugins.shapes import DEFAULT_WAYS, parse_caption, vote

    data = splits()
    rows, said = [], []
    for model in MODELS:
        for w in ways_of(model, data):
            said.append(w["answers"])
            rows.append({"way": w["way"], **{f"{split} {key}": score(w["answers"][split][key], data[split][1], key)
                                             for split in data for key in KEYS}})
    votes = []
    for key in KEYS:  # the best k dev ways of this attribute (a stable sort: ties keep the listing order)
        best = sorted(range(len(rows)), key=lambda i: -rows[i][f"dev {key}"])
        for k in VOTES:
            answers = {split: vote([said[i][split][key] for i in best[:k]]) for split in data}
            votes.append({"key": key, "k": k, "way": {"way": "vote", "ways": [rows[i]["way"] for i in best[:k]]},
                          **{f"{split} {key}": score(answers[split], data[split][1], key) for split in data}})
    chosen = {key: max(rows + [v for v in votes if v["key"] == key], key=lambda r: r[f"dev {key}"])["way"]
              for key in KEYS}
    reader = limner.create("text_encoders", "shapes_reader", encoder="minilm", **chosen)
    whole, phrases = {}, []
    for split, (prompts, truth) in data.items():
        start = time.perf_counter()
        read = [parse_caption(c)[0] for c in reader.read(prompts)]
        got = [{"colour": o.colour, "shape": o.shape, "place": o.position} for o in read]
        whole[split] = {**{key: score([g[key] for g in got], truth, key) for key in KEYS},
                        "all three": sum(g == t for g, t in zip(got, truth)) / len(truth),
                        "seconds per prompt": round((time.perf_counter() - start) / len(prompts), 3)}
        phrases += place_phrases(split, prompts, truth, [g["place"] for g in got])
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows, "votes": votes, "chosen": chosen,
              "defaults_are_chosen": chosen == DEFAULT_WAYS, "reader": whole, "place phrases": phrases}
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(result))
    return result


def way_name(w: dict) -> str:
    if w["way"] == "vote":
        return f"vote of {len(w['ways'])}: " + "; ".join(way_name(v) for v in w["ways"])
    if w["way"] == "nearest":
        return f"{w['model']}, nearest caption at layer {w['layer']}"
    return f"{w['model']}, ask, {w['examples']} examples{', calibrated' if w['calibrated'] else ''}"


def render(data: dict) -> str:
    pct = "{:.1f}%".format
    lines = ["# Reading prompts in other words into the grammar: the ways, per attribute (issue 27)", "",
             "Each way `shapes_reader` (plugins/shapes.py) offers, for SmolLM2, Gemma 3 270M and all-mpnet-base-v2 "
             "(MPNet, a sentence encoder: the nearest way only), scored on the 200 "
             "dev and 200 held-out phrasings (benchmarks/phrasings.py) per attribute, and votes of each attribute's "
             "best 3-11 dev ways (the answer most of them give; a tie goes to the better dev way's); the best on dev "
             "(a single way before a vote where they tie) is chosen per attribute, and the reader with those ways "
             "reads the prompts whole. Chance: colour 17%, "
             "shape 33%, place 11%. "
             f"{data['cpu']}, {data['date']}. `python benchmarks/reader_ways.py benchmarks/results/reader-ways.json`.",
             "", "## The reader with the chosen ways", "",
             "| attribute | chosen way (best dev) | dev | held-out |", "|---|---|---:|---:|"]
    for key in KEYS:
        lines.append(f"| {key} | {way_name(data['chosen'][key])} | {pct(100 * data['reader']['dev'][key])} | "
                     f"{pct(100 * data['reader']['heldout'][key])} |")
    lines.append(f"| all three | | {pct(100 * data['reader']['dev']['all three'])} | "
                 f"{pct(100 * data['reader']['heldout']['all three'])} |")
    lines += ["", f"Reading took {data['reader']['heldout']['seconds per prompt']} s a held-out prompt (batches of "
              "200). The chosen ways are the reader's defaults: "
              f"{'yes' if data['defaults_are_chosen'] else 'NO'}.", "", "## Every way", "",
              "| way | dev colour | shape | place | held-out colour | shape | place |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {way_name(r['way'])} | " + " | ".join(pct(100 * r[f'{s} {k}']) for s in ("dev", "heldout")
                                                              for k in KEYS) + " |")
    lines += ["", "## The reader's place, per place phrase", "",
              "Where the place is read wrong: how often each phrase's place is read right, and what it is read as "
              "instead (most often first).", "",
              "| split | phrase | means | read right | read instead |", "|---|---|---|---:|---|"]
    for r in data["place phrases"]:
        instead = ", ".join(f"{p} ({n})" for p, n in sorted(r["wrong"].items(), key=lambda x: -x[1]))
        lines.append(f"| {r['split']} | {r['phrase']} | {r['means']} | {r['right']}/{r['prompts']} | {instead} |")
    lines += ["", "## Votes of an attribute's best dev ways", "",
              "| attribute | ways voting (best dev first) | dev | held-out |", "|---|---|---:|---:|"]
    for v in data["votes"]:
        key = v["key"]
        lines.append(f"| {key} | {way_name(v['way'])} | {pct(100 * v[f'dev {key}'])} | "
                     f"{pct(100 * v[f'heldout {key}'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--render":  # the table again from a results file, nothing run
        out = Path(sys.argv[2])
        out.with_suffix(".md").write_text(render(json.loads(out.read_text())))
        return
    if len(sys.argv) != 2:
        sys.exit("usage: reader_ways.py OUT.json  (or --render OUT.json)")
    print(render(run(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
