"""Three more ways to read a frozen language model for prompts in other words (issue 27), each
scored on the dev and held-out phrasings (benchmarks/phrasings.py) without training a denoiser,
beside encoder_knowledge.py's `ask`, `nearest` and `reading`:

- `nearest caption`: each prompt -> the one-object training caption (486) whose token states
  match its own best, by BERTScore (Zhang et al. 2020: the F1 of each token's best cosine match
  in the other text), after removing the training tokens' mean; at every layer (MiniLM: its
  output tokens), the layer chosen on dev. The model's knowledge used whole, by retrieval: a
  prompt that finds its caption would be drawn as well as the caption.
- `answer states`: a linear probe (logistic regression, as encoder_probe.py) trained on the
  training captions' states at the answer position of encoder_knowledge's four reading
  questions (4 worked examples: 'Picture: {prompt}\\nColour:', 'Shape:', 'Height ...:', 'Side
  ...:', the four states side by side), per layer, the layer chosen on dev: what a denoiser
  conditioned on the model's unspoken answers could learn from the training captions.
- `place question`: each place phrase alone, 'Q: In which part of a picture is something that
  is {phrase}?\\nA: In the' followed by each training place ("top left", ..., "center"), the
  answer the one whose tokens are likeliest (mean log-probability); with 0 or 3 worked examples
  (training places), raw or calibrated (Zhao et al. 2021: less the answers' scores for 'N/A'),
  the way chosen on dev.

Colour, shape and place are each scored on their own here (the shapes scorer counts shape and
place only where the colour came out, so its numbers are lower). Chance: colour 17%, shape
33%, place 11%.

    python benchmarks/encoder_ceiling.py benchmarks/results/encoder-ceiling.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
KEYS = ("colour", "shape", "place")
PLACE_Q = "Q: In which part of a picture is something that is {w}?\nA: In the"
PLACE_SHOTS = ("top left", "bottom", "right")


def splits() -> dict:
    """name -> (prompts, [(colour, shape, place)]) for the training captions, dev and held-out."""
    from encoder_probe import labels, training_captions

    train = training_captions()
    out = {"train": (train, [labels(c) for c in train])}
    for name in ("dev", "heldout"):
        rows = json.loads((HERE / f"{name}-phrasings.json").read_text())
        out[name] = [r["prompt"] for r in rows], [labels(r["means"]) for r in rows]
    return out


def scores(picked: list[tuple], truth: list[tuple]) -> dict:
    right = [[p[k] == t[k] for k in range(3)] for p, t in zip(picked, truth)]
    return {**{key: sum(r[k] for r in right) / len(right) for k, key in enumerate(KEYS)},
            "all three": sum(all(r) for r in right) / len(right)}


def by_layer(per_layer: list[dict], label: str, encoder: str, reading: str) -> dict:
    """The row of the layer with the best dev mean of colour, shape and place."""
    best = max(range(len(per_layer)), key=lambda k: sum(per_layer[k]["dev"][key] for key in KEYS))
    return {"encoder": encoder, "reading": f"{reading} at layer {best} (best dev mean of 0..{len(per_layer) - 1})",
            **per_layer[best], "layers": per_layer, "label": label}


def caption_rows(enc, label: str, data: dict) -> dict:
    from limner.plugins.shapes import nearest_caption

    train_y = data["train"][1]
    layers = range(len(enc.model.blk) + 1)
    states = {name: enc.token_states(prompts, layers) for name, (prompts, _) in data.items()}
    per_layer = [{name: scores([train_y[i] for i in nearest_caption(states["train"][k], states[name][k])],
                               data[name][1]) for name in ("dev", "heldout")} for k in range(len(states["train"]))]
    return by_layer(per_layer, "nearest caption", label, "nearest caption")


def minilm_caption_row(data: dict) -> dict:
    import torch

    import limner
    from limner.plugins.shapes import nearest_caption

    enc = limner.create("text_encoders", "minilm")
    with torch.no_grad():
        states = {}
        for name, (prompts, _) in data.items():
            e = enc.encode(prompts)
            states[name] = [t[m] for t, m in zip(e.tokens.float(), e.mask.bool())]
    train_y = data["train"][1]
    row = {name: scores([train_y[i] for i in nearest_caption(states["train"], states[name])], data[name][1])
           for name in ("dev", "heldout")}
    return {"encoder": "minilm", "reading": "nearest caption, output tokens", **row, "label": "nearest caption"}


def answer_rows(enc, label: str, data: dict) -> dict:
    import torch
    from encoder_knowledge import READ, llm_states, question, worked_examples
    from encoder_probe import probe

    examples = worked_examples(4)  # encoder_knowledge.reading's first four

    def states(prompts: list[str], key: str):
        return torch.cat([llm_states(enc, [question(p, key, examples) for p in prompts[i: i + 64]])
                          for i in range(0, len(prompts), 64)], 1)

    # [layers + 1, N, 4 D]: the four questions' states side by side
    feats = {name: torch.cat([states(prompts, key) for key in READ], -1) for name, (prompts, _) in data.items()}
    per_layer = []
    for k in range(len(feats["train"])):
        row = {}
        for name in ("dev", "heldout"):
            s = probe(feats["train"][k].numpy(), data["train"][1], feats[name][k].numpy(), data[name][1])
            row[name] = {"colour": s["colour"], "shape": s["shape"], "place": s["position"]}
        per_layer.append(row)
    return by_layer(per_layer, "answer states", label, "answer states, 4 worked examples, linear probe,")


def place_rows(enc, label: str) -> dict:
    import torch
    from encoder_knowledge import word_sets

    from limner.plugins.llama import right_padded

    places = word_sets()["place"]["meaning"]

    def score_answers(phrases: list[str], prefix: str):
        out = torch.zeros(len(phrases), len(places))
        with torch.no_grad():
            for j, a in enumerate(places):
                answer = enc.tokenizer.encode(" " + a, add_special_tokens=False).ids
                rows = [[enc.bos, *enc.tokenizer.encode(prefix + PLACE_Q.format(w=w), add_special_tokens=False).ids,
                         *answer] for w in phrases]
                ids, mask = right_padded(rows)
                states, k = enc.model.output_norm(enc.model(ids, mask)[-1]), len(answer)
                for i, r in enumerate(rows):  # the head only where the answer's tokens are predicted
                    logp = torch.log_softmax(enc.model.head(states[i, len(r) - k - 1: len(r) - 1]).float(), -1)
                    out[i, j] = logp.gather(1, torch.tensor(answer)[:, None]).mean()
        return out

    sets = word_sets()["place"]
    ways = []
    for shots in (0, len(PLACE_SHOTS)):
        prefix = "".join(f"{PLACE_Q.format(w='at the ' + s)} {s}\n\n" for s in PLACE_SHOTS[:shots])
        null = score_answers(["N/A"], prefix)[0]
        got = {}
        for name in ("dev", "heldout"):
            words, truth = zip(*sets[name])
            raw = score_answers(list(words), prefix)
            for calibrated, s in ((False, raw), (True, raw - null)):
                picks = [places[i] for i in s.argmax(-1).tolist()]
                got.setdefault(calibrated, {})[name] = sum(p == t for p, t in zip(picks, truth)) / len(truth)
        ways += [{"examples": shots, "calibrated": c, **g} for c, g in got.items()]
    best = max(ways, key=lambda w: w["dev"])
    return {"encoder": label, "label": "place question",
            "reading": f"place question, {best['examples']} worked examples"
                       f"{', calibrated' if best['calibrated'] else ''} (best of 4 ways on dev)",
            "dev": {"place": best["dev"]}, "heldout": {"place": best["heldout"]}, "ways": ways}


def render(data: dict) -> str:
    cols = (*KEYS, "all three")
    lines = ["# More readings of a frozen language model, without training (issue 27)", "",
             "Scored on the 200 dev and 200 held-out phrasings (benchmarks/phrasings.py); each attribute on its "
             "own (the shapes scorer of heldout-phrasings.md counts shape and place only where the colour came "
             "out). `nearest caption`: each prompt's best-matching one-object training caption by BERTScore over "
             "centred token states; `answer states`: a linear probe trained on the training captions' states at the "
             "answer positions of four few-shot reading questions; `place question`: the training place the model "
             "finds likeliest for each place phrase alone (the module docstring of the script says each exactly). "
             "Layers and ways are chosen on dev. Chance: colour 17%, shape 33%, place 11%. "
             f"{data['cpu']}, {data['date']}. `python benchmarks/encoder_ceiling.py "
             "benchmarks/results/encoder-ceiling.json`.", "",
             "| encoder | reading | dev colour | shape | place | all three | held-out colour | shape | place | "
             "all three |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        cells = [r[split].get(k) for split in ("dev", "heldout") for k in cols]
        lines.append(f"| {r['encoder']} | {r['reading']} | "
                     + " | ".join("" if v is None else f"{100 * v:.1f}%" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import limner
    from limner.bench import cpu_name
    from limner.files import write_text_atomic

    if len(sys.argv) != 2:
        sys.exit("usage: encoder_ceiling.py OUT.json")
    out = Path(sys.argv[1])
    sys.path.insert(0, str(HERE))
    data = splits()
    rows = []
    for label in ("smollm2", "gemma3_270m"):
        enc = limner.create("text_encoders", label)
        for measure in (caption_rows, answer_rows):
            start = time.perf_counter()
            rows.append({**measure(enc, label, data), "seconds": round(time.perf_counter() - start, 1)})
            print(rows[-1]["encoder"], rows[-1]["reading"], rows[-1]["dev"], rows[-1]["heldout"], flush=True)
        rows.append(place_rows(enc, label))
        print(rows[-1]["encoder"], rows[-1]["reading"], rows[-1]["dev"], rows[-1]["heldout"], flush=True)
    rows.append(minilm_caption_row(data))
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), render(result))
    print(render(result))


if __name__ == "__main__":
    main()
