"""Which reading of a text encoder carries over to words the training captions never use
(issue 27), measured cheaply before any image model is trained: a linear probe (logistic
regression) learns colour, shape and position from the embeddings of the 486 one-object
training captions and is scored on paraphrases. A reading whose probe fails there gives a
denoiser trained on those captions nothing to follow. Readings are ranked on the dev
phrasings (benchmarks/dev-phrasings.json); the held-out phrasings' column is shown, not chosen on.
A reading's features: the mean of its tokens at each layer it reads, and its pooled vector.

    python benchmarks/encoder_probe.py benchmarks/results/encoder-probe.json
    python benchmarks/encoder_probe.py benchmarks/results/encoder-probe.json --add gemma3_270m

`--add ENCODER` probes another language model (a text encoder's name, such as `gemma3_270m`, or
a GGUF file's path, read by `gguf_llm`) at the same fractions of its depth and puts its rows in
the results file beside those already there (a rerun replaces that encoder's rows).
"""
from __future__ import annotations

import json
import sys
import time
from itertools import product
from pathlib import Path

HERE = Path(__file__).parent
TEMPLATES = {
    "plain": "{prompt}",
    "instruction": "Describe the colour, the shape and the place of the object in this picture: {prompt}",
    "chat": "<|im_start|>system\nYou draw simple pictures of one coloured shape.<|im_end|>\n<|im_start|>user\n{prompt}",
    "prompteol": 'This sentence : "{prompt}" means in one word:"',
}


def language_model(added: str) -> tuple[str, dict]:
    """(label, component) of `--add ENCODER`: a .gguf path read by gguf_llm (labelled by its file
    name), else a text encoder's name."""
    return (Path(added).stem, {"name": "gguf_llm", "path": added}) if added.endswith(".gguf") \
        else (added, {"name": added})


def training_captions() -> list[str]:
    from limner.plugins.shapes import one_object_captions

    return one_object_captions()


def labels(caption: str) -> tuple[str, str, str]:
    from limner.plugins.shapes import parse_caption

    o = parse_caption(caption)[0]
    return o.colour, o.shape, o.position


def features(encode, prompts: list[str]):
    import torch

    with torch.no_grad():
        return torch.cat([encode(prompts[i: i + 64]) for i in range(0, len(prompts), 64)]).numpy()


def probe(train_x, train_y, test_x, test_y) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scores = {}
    for k, name in enumerate(("colour", "shape", "position")):
        scale = StandardScaler().fit(train_x)
        model = LogisticRegression(max_iter=2000, C=1.0).fit(scale.transform(train_x), [y[k] for y in train_y])
        scores[name] = float((model.predict(scale.transform(test_x)) == [y[k] for y in test_y]).mean())
    return scores


def main() -> None:
    import torch

    import limner
    from limner.files import write_text_atomic

    torch.manual_seed(0)
    out = Path(sys.argv[1])
    added = sys.argv[3] if sys.argv[2:3] == ["--add"] and len(sys.argv) == 4 else None
    if sys.argv[2:] and added is None:
        sys.exit("usage: encoder_probe.py OUT.json [--add ENCODER (a text encoder's name or a .gguf path)]")
    train = training_captions()
    train_y = [labels(c) for c in train]
    sets = {}
    for name in ("dev", "heldout"):
        rows = json.loads((HERE / f"{name}-phrasings.json").read_text())
        sets[name] = [r["prompt"] for r in rows], [labels(r["means"]) for r in rows]
    rows = []

    def measure(encoder: str, reading: str, encode) -> None:
        t = time.perf_counter()
        x = features(encode, train)
        row = {"encoder": encoder, "reading": reading}
        for name, (prompts, y) in sets.items():
            scores = probe(x, train_y, features(encode, prompts), y)
            row[name] = {**scores, "mean": round(sum(scores.values()) / 3, 4)}
        rows.append({**row, "seconds": round(time.perf_counter() - t, 1)})
        print(rows[-1], flush=True)

    if added is None:
        minilm = limner.create("text_encoders", "minilm")
        measure("minilm", "mean-pooled (as trained with)", lambda p: minilm.encode(p).pooled)
    label, component = ("smollm2", {"name": "smollm2"}) if added is None else language_model(added)

    for name, template in TEMPLATES.items():
        enc = limner.create("text_encoders", **component, template=template)
        n = len(enc.model.blk)  # SmolLM2's 30 layers: 30, 29, 24, 20, ..., 4; 2..12 + 24; 6 + 30
        at = [round(n * f / 30) for f in (24, 20, 16, 12, 8, 4, 2, 6)]
        layer_sets = ([(k,) for k in (n, n - 1, *at[:6])] + [(k, at[0]) for k in (at[6], at[5], at[7], at[4], at[3])]
                      + [(at[7], n)])
        cache: dict[tuple, tuple] = {}

        def reading(prompts, layers, pool, enc=enc, cache=cache):
            key = tuple(prompts)
            if key not in cache:  # one forward for every layer of this prompt list
                ids, mask, lengths = enc.tokenize(prompts)
                index, kept = enc.kept(lengths)
                rows = torch.arange(len(ids))[:, None]
                cache[key] = [enc.model.output_norm(s)[rows, index] for s in enc.model(ids, mask)], kept
            states, kept = cache[key]
            w = kept[..., None].float()
            means = [(states[k] * w).sum(1) / w.sum(1) for k in layers]
            last = states[layers[-1]]
            pooled = last[torch.arange(len(last)), kept.sum(1) - 1] if pool == "last" else means[-1]
            return torch.cat([*means, pooled], dim=1)

        for pool, layers in product(("mean", "last"), layer_sets):
            said = "+".join(f"{k}{' (last)' if k == n else ''}" for k in layers)
            measure(label, f"layer {said}, template {name}, pool {pool}",
                    lambda p, layers=layers, pool=pool: reading(p, layers, pool))
    from limner.bench import cpu_name

    cpu, date = cpu_name(), time.strftime("%Y-%m-%d")
    if added:  # beside the rows already there, which keep the file's machine and date; these name theirs
        before = json.loads(out.read_text())
        rows = [r for r in before["rows"] if r["encoder"] != label] + [{**r, "cpu": cpu, "date": date, "added": added}
                                                                            for r in rows]
        cpu, date = before["cpu"], before["date"]
    result = {"what": "linear probes trained on the 486 training captions' embeddings, scored on 200 dev and 200 "
                      "held-out phrasings", "cpu": cpu, "date": date, "templates": TEMPLATES,
              "rows": rows}
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    lines = ["# Text encoder readings probed on paraphrased prompts (issue 27)", "",
             f"{result['what']} (benchmarks/dev-phrasings.json, benchmarks/heldout-phrasings.json: the colour and "
             "shape words of the two sets are disjoint); a logistic regression per attribute, ranked by the dev mean. "
             f"{cpu}, {result['date']}. `python benchmarks/encoder_probe.py {out}`. Chance: colour 17%, shape 33%, "
             "position 11%. Templates: " + "; ".join(f"{k} = `{v!r}`" for k, v in TEMPLATES.items()) + ".", "",
             "| encoder | reading | dev colour | shape | position | mean | held-out colour | shape | position | mean |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["dev"]["mean"]):
        cells = [f"{r[k][a]:.0%}" for k in ("dev", "heldout") for a in ("colour", "shape", "position", "mean")]
        lines.append(f"| {r['encoder']} | {r['reading']} | " + " | ".join(cells) + " |")
    lines += sorted({f"\n{r['encoder']}'s rows: {r['cpu']}, {r['date']}, `python benchmarks/encoder_probe.py {out} "
                     f"--add {r['added']}`." for r in rows if "cpu" in r})
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
