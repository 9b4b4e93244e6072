"""Does the text encoder know the words at all? (issue 27) What a frozen encoder itself knows
of the paraphrases' words: a model conditioned on it, trained on the training captions only,
can hardly carry more over to them (not a strict bound: place phrases share words such as
"left" with the training captions, which a trained model can follow without knowing the rest).

For each colour word, shape word and place phrase of the dev and held-out phrasings
(benchmarks/phrasings.py), the encoder is asked which training word it means, without
training anything:

- `ask` (a language model only): the model continues 'Q: What basic colour is {word}?\\nA: It
  is' (shapes: '... basic shape is a {word}?\\nA: It is a'); the answer is the training word
  (red, green, ...) whose first token it finds likeliest next;
- `nearest`: the word in a short frame ("the colour {word}", "a {word}", the place phrase
  alone) is encoded, its state at the word's last token (MiniLM: its mean-pooled vector)
  compared by cosine, after removing the training words' mean, with the training words in
  the same frame ("the colour red", "a circle", "at the top left"); the nearest one is the
  answer. A language model is read at every layer; the layer is chosen on the dev words and
  the held-out words are scored at that layer.

And the route through paraphrases the language model writes itself: SmolLM2 is asked to
rewrite a few training captions in other words (greedy, chat template), and to name other
words for each training colour and shape (greedy, repeats banned), and what it writes is
shown, its word lists checked against the dev and held-out words. And the route through the
language model reading the prompt itself (`reading`): asked the colour, shape, height and side
of each whole dev and held-out prompt, after worked examples that are training captions, how
often it answers right (what a prompt rewritten into the training grammar by it could reach).

    python benchmarks/encoder_knowledge.py benchmarks/results/encoder-knowledge.json
    python benchmarks/encoder_knowledge.py benchmarks/results/encoder-knowledge.json --add gemma3_270m

`--add ENCODER` (a text encoder's name or a GGUF file's path) puts another language model's
`ask`, `nearest` and `reading` results beside those already in the file (the rewrites and word
lists stay SmolLM2's: they use its chat template).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# the reading's questions, answers and worked examples are the shapes reader's (plugins/shapes.py)
from limner.plugins.shapes import ANSWERS, answers, question, worked_examples
from limner.plugins.shapes import QUESTIONS as READ

HERE = Path(__file__).parent
ASK = {"colour": ("Q: What basic colour is {w}?\nA: It is", " {c}"),
       "shape": ("Q: What basic shape is a {w}?\nA: It is a", " {c}")}
FRAMES = {"colour": "the colour {w}", "shape": "a {w}", "place": "{w}"}


def word_sets() -> dict:
    """attribute -> {"train": training words, "dev": [(word, meaning)], "heldout": [...]}."""
    sys.path.insert(0, str(HERE))
    import phrasings as ph

    from limner.plugins.shapes import COLOURS, POSITIONS, SHAPES

    out = {}
    for key, train, dev, held in (("colour", list(COLOURS), ph.DEV_COLOURS, ph.COLOURS),
                                  ("shape", list(SHAPES), ph.DEV_SHAPES, ph.SHAPES),
                                  ("place", list(POSITIONS), ph.DEV_PLACES, ph.PLACES)):
        out[key] = {"train": train if key != "place" else [f"at the {p}" for p in train],
                    "meaning": train,
                    "dev": [(w, k) for k, words in dev.items() for w in words],
                    "heldout": [(w, k) for k, words in held.items() for w in words]}
    return out


def llm_states(enc, texts: list[str]):
    """Every layer's state (the last through the final norm) at each text's last token: [layers+1, N, D]."""
    return states_of(enc, [[enc.bos, *enc.tokenizer.encode(t, add_special_tokens=False).ids] for t in texts])


def states_of(enc, rows: list[list[int]]):
    """llm_states of token id rows."""
    import torch

    from limner.plugins.llama import right_padded

    ids, mask = right_padded(rows)
    with torch.no_grad():
        states = enc.model(ids, mask)
        last = mask.sum(1) - 1
        picked = [s[torch.arange(len(rows)), last] for s in states]
        picked[-1] = enc.model.output_norm(picked[-1])
    return torch.stack(picked)


def nearest(train, words):
    """Each word's nearest training word by centred cosine: [..., T, D] against [..., N, D] -> [..., N]."""
    import torch.nn.functional as F

    centre = train.mean(-2, keepdim=True)
    sim = F.normalize(words - centre, dim=-1) @ F.normalize(train - centre, dim=-1).transpose(-1, -2)
    return sim.argmax(-1)


def score(picks, meaning: list[str], truth: list[str]) -> float:
    return sum(meaning[i] == t for i, t in zip(picks.tolist(), truth)) / len(truth)


def llm_rows(enc, sets: dict, label: str = "smollm2") -> list[dict]:
    """The `ask` and `nearest` rows of the language model `enc` (SmolLM2 unless `label` says)."""
    import torch

    rows = []
    ask = {}
    for key, (asked, answer) in ASK.items():
        s = sets[key]
        first = [enc.tokenizer.encode(answer.format(c=c), add_special_tokens=False).ids[0] for c in s["meaning"]]
        for split in ("dev", "heldout"):
            words, truth = zip(*s[split])
            last = llm_states(enc, [asked.format(w=w) for w in words])[-1]
            logits = enc.model.head(last)
            ask[(key, split)] = score(logits[:, first].argmax(-1), s["meaning"], list(truth))
    rows.append({"encoder": label, "reading": "ask: next-token answer over the training words",
                 **{f"{split} {key}": ask.get((key, split)) for split in ("dev", "heldout") for key in sets}})
    per_layer = {}
    for key, s in sets.items():
        train = llm_states(enc, [FRAMES[key].format(w=w) for w in s["train"]])
        for split in ("dev", "heldout"):
            words, truth = zip(*s[split])
            states = llm_states(enc, [FRAMES[key].format(w=w) for w in words])
            picks = nearest(train, states)
            per_layer[(key, split)] = torch.tensor([score(p, s["meaning"], list(truth)) for p in picks])
    dev_mean = sum(per_layer[(k, "dev")] for k in sets) / len(sets)
    best = int(dev_mean.argmax())
    rows.append({"encoder": label,
                 "reading": f"nearest at layer {best} (best dev mean of layers 0..{len(dev_mean) - 1})",
                 **{f"{split} {key}": float(per_layer[(key, split)][best]) for split in ("dev", "heldout")
                    for key in sets}})
    for key in sets:  # each attribute's own best layer on dev: a looser bound
        k = int(per_layer[(key, "dev")].argmax())
        rows.append({"encoder": label, "reading": f"nearest, {key} at its best dev layer ({k})",
                     f"dev {key}": float(per_layer[(key, "dev")][k]),
                     f"heldout {key}": float(per_layer[(key, "heldout")][k])})
    return rows


REWRITE = ('<|im_start|>user\nRewrite this description of a picture in other words, with another word for the '
           'colour and for the shape: "{caption}"<|im_end|>\n<|im_start|>assistant\n')
REWRITTEN = ["a red circle at the top left", "a small blue square at the center",
             "a large yellow triangle at the bottom", "a green circle at the right"]


def greedy(enc, texts: list[str], tokens: int, ban: list[str] | None = None) -> list[str]:
    """SmolLM2's greedy continuations of `texts` (whole forward per token: short texts). With
    `ban` (the words of each text it must not say), no token is written twice nor any of those
    words' tokens, separators excepted (no_repeat_ngram_size = 1 on all but commas and line
    breaks), and a full stop ends it: the usual cure for a small model's loops."""
    import torch

    end = enc.tokenizer.token_to_id("<|im_end|>")
    free = {t for sep in (",", " ,", "\n", "\n\n", " and", ";")
            for t in enc.tokenizer.encode(sep, add_special_tokens=False).ids}
    stop = set(enc.tokenizer.encode(".", add_special_tokens=False).ids)
    rows = [[enc.bos, *enc.tokenizer.encode(t, add_special_tokens=False).ids] for t in texts]
    banned = [set() if ban is None else {t for w in (ban[i], " " + ban[i], ban[i].capitalize(),
                                                     " " + ban[i].capitalize())
                                         for t in enc.tokenizer.encode(w, add_special_tokens=False).ids} - free
              for i in range(len(rows))]
    written, done = [[] for _ in rows], [False] * len(rows)
    for _ in range(tokens):
        logits = enc.model.head(states_of(enc, [r + w for r, w in zip(rows, written)])[-1])
        for i in range(len(rows)):
            if banned[i]:
                logits[i, torch.tensor(sorted(banned[i]))] = float("-inf")
        for i, t in enumerate(logits.argmax(-1).tolist()):
            done[i] = done[i] or t in (end, enc.eos) or (ban is not None and t in stop)
            if not done[i]:
                written[i].append(t)
                if ban is not None and t not in free:
                    banned[i].add(t)
        if all(done):
            break
    return [enc.tokenizer.decode(w) for w in written]


def rewrites(enc, tokens: int = 32) -> list[list[str]]:
    """SmolLM2's greedy rewrites of a few training captions."""
    return [[c, w] for c, w in zip(REWRITTEN, greedy(enc, [REWRITE.format(caption=c) for c in REWRITTEN], tokens))]


LIST = ('<|im_start|>user\nName other words for the {kind} {word}.<|im_end|>\n<|im_start|>assistant\n'
        'Other words for {word}:')


def word_lists(enc, sets: dict, tokens: int = 40) -> list[dict]:
    """SmolLM2 asked for other words for each training colour and shape (the word-level route to
    paraphrased training captions), decoded greedily with repeats banned; each list checked
    against the dev and held-out words: how many of its own meaning's it names (right) and how
    many of another meaning's (wrong: training on it would teach them as this colour or shape)."""
    import re

    out = []
    for key in ("colour", "shape"):
        s = sets[key]
        meaning = {w.lower(): m for split in ("dev", "heldout") for w, m in s[split]}
        texts = [LIST.format(kind=key, word=c) for c in s["meaning"]]
        for c, said in zip(s["meaning"], greedy(enc, texts, tokens, ban=s["meaning"])):
            words = {w.strip(" -*.:\"'0123456789") for w in re.split(r"[,;\n]|\band\b", said.lower())} - {""}
            named = sorted(w for w in words if w in meaning)
            out.append({"kind": key, "word": c, "said": said, "right": [w for w in named if meaning[w] == c],
                        "wrong": [f"{w} ({meaning[w]})" for w in named if meaning[w] != c]})
    return out


SAID = {"colour": "colour", "shape": "shape", "row": "height", "column": "side"}  # as the tables name them


def reading(enc, shots: tuple[int, ...] = (0, 4, 8)) -> dict:
    """SmolLM2 reads each whole dev and held-out prompt and answers each attribute ('Picture:
    {prompt}\nColour:') with the first token it finds likeliest among the training words (the
    place as a row and a column), after k worked examples that are training captions (seeded
    random ones: training words only). Each way with and without contextual calibration (Zhao
    et al. 2021: the answers' log-probabilities for the content-free prompt 'N/A' subtracted).
    The way is chosen per attribute on dev; the place is right when row and column both are."""
    examples = worked_examples(max(shots))
    splits = {name: json.loads((HERE / f"{name}-phrasings.json").read_text()) for name in ("dev", "heldout")}

    def asked(text: str, key: str, k: int) -> str:
        return question(text, key, examples[:k])

    def log_probs(texts: list[str], key: str):
        return enc.next_token_log_probs(texts, ANSWERS[key])

    right, ways = {}, []  # (way, key, split) -> per-prompt right answers
    for k in shots:
        for key in READ:
            null = log_probs([asked("N/A", key, k)], key)[0]
            for split, rows in splits.items():
                lp = log_probs([asked(r["prompt"], key, k) for r in rows], key)
                truth = [answers(r["means"])[key] for r in rows]
                for calibrated in (False, True):
                    picks = (lp - null if calibrated else lp).argmax(-1).tolist()
                    right[((k, calibrated), key, split)] = [ANSWERS[key][i] == t for i, t in zip(picks, truth)]
        ways += [(k, False), (k, True)]

    def mean(xs):
        return sum(xs) / len(xs)

    chosen = {key: max(ways, key=lambda w: mean(right[(w, key, "dev")])) for key in READ}
    place = {split: mean([r and c for r, c in zip(right[(chosen["row"], "row", split)],
                                                  right[(chosen["column"], "column", split)])]) for split in splits}
    every = {split: mean([all(answer) for answer in zip(*(right[(chosen[key], key, split)] for key in READ))])
             for split in splits}
    return {"examples": examples,
            "ways": [{"examples": k, "calibrated": cal, **{f"{split} {key}": mean(right[((k, cal), key, split)])
                                                           for split in splits for key in READ}}
                     for k, cal in ways],
            "chosen": {key: {"examples": w[0], "calibrated": w[1]} for key, w in chosen.items()},
            "chosen_scores": {f"{split} {key}": mean(right[(chosen[key], key, split)])
                              for split in splits for key in ("colour", "shape")} |
                             {f"{split} place": place[split] for split in splits} |
                             {f"{split} all three": every[split] for split in splits}}


def minilm_row(sets: dict) -> dict:
    import torch

    from limner.plugins.text_encoders import minilm

    enc = minilm()
    row = {"encoder": "minilm", "reading": "nearest, mean-pooled sentence vector"}
    with torch.no_grad():
        for key, s in sets.items():
            train = enc.encode([FRAMES[key].format(w=w) for w in s["train"]]).pooled
            for split in ("dev", "heldout"):
                words, truth = zip(*s[split])
                picks = nearest(train, enc.encode([FRAMES[key].format(w=w) for w in words]).pooled)
                row[f"{split} {key}"] = score(picks, s["meaning"], list(truth))
    return row


def render(data: dict) -> str:
    keys = ("colour", "shape", "place")
    lines = ["# Does the text encoder know the paraphrases' words? (issue 27)", "",
             "Each colour word, shape word and place phrase of the dev and held-out phrasings "
             "(benchmarks/phrasings.py: "
             f"{data['counts']}) mapped to a training word with nothing trained: `ask` reads SmolLM2's next-token "
             "answer to 'Q: What basic colour is {word}?' over the training words; `nearest` takes the training word "
             "whose encoding (in the same short frame) is nearest by centred cosine. What the encoder itself "
             "knows of the words: a model conditioned on it and trained on the training captions only can hardly "
             "carry more over (place phrases share words such as \"left\" with the captions, which it can follow "
             "without knowing the rest). Chance: colour 17%, shape 33%, "
             f"place 11%. {data['cpu']}, {data['date']}. `python benchmarks/encoder_knowledge.py "
             "benchmarks/results/encoder-knowledge.json`.", "",
             "| encoder | reading | dev colour | shape | place | held-out colour | shape | place |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        cells = [r.get(f"{split} {k}") for split in ("dev", "heldout") for k in keys]
        lines.append(f"| {r['encoder']} | {r['reading']} | "
                     + " | ".join("" if v is None else f"{100 * v:.0f}%" for v in cells) + " |")
    if data.get("rewrites"):
        lines += ["", "Asked to rewrite training captions in other words (`REWRITE` in the script, greedy, at most 32 "
                  "tokens), SmolLM2 writes:", ""]
        lines += [f"- {c!r} -> {w!r}" for c, w in data["rewrites"]]
    if data.get("lists"):
        lists = data["lists"]
        right, wrong = sum(len(r["right"]) for r in lists), sum(len(r["wrong"]) for r in lists)
        lines += ["", "Asked for other words, word by word (`LIST` in the script: 'Name other words for the colour "
                  "red.', the answer begun with 'Other words for red:', greedy with no token written twice but "
                  f"separators, ended by a full stop, at most 40 tokens), SmolLM2 names {right} of the dev and "
                  f"held-out words under their own meaning and {wrong} under another's (training captions varied "
                  "with these lists would teach those as the wrong colour or shape):", ""]
        lines += [f"- {r['kind']} {r['word']!r}: {r['said'].strip()!r} (right: {', '.join(r['right']) or 'none'}; "
                  f"wrong: {', '.join(r['wrong']) or 'none'})" for r in lists]
    if data.get("reading"):
        r = data["reading"]
        lines += ["", "Asked to read the whole prompt (`reading` in the script: 'Picture: {prompt}\\nColour:', "
                  "likewise 'Shape:', 'Height (top, middle or bottom):', 'Side (left, middle or right):'; the answer "
                  "the training word whose first token is likeliest next; after 0, 4 or 8 worked examples that are "
                  "training captions; with and without contextual calibration, Zhao et al. 2021), SmolLM2 answers "
                  "(200 dev and 200 held-out prompts of benchmarks/phrasings.py; chance: colour 17%, shape, height "
                  "and side 33%):", "",
                  "| examples | calibrated | dev colour | shape | height | side | held-out colour | shape | height | "
                  "side |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for w in r["ways"]:
            cells = [w[f"{split} {key}"] for split in ("dev", "heldout") for key in READ]
            lines.append(f"| {w['examples']} | {'yes' if w['calibrated'] else 'no'} | "
                         + " | ".join(f"{100 * v:.0f}%" for v in cells) + " |")
        c, sc = r["chosen"], r["chosen_scores"]
        lines += ["", "Chosen per attribute on dev (" + ", ".join(
            f"{SAID[key]}: {c[key]['examples']} examples{', calibrated' if c[key]['calibrated'] else ''}"
            for key in READ)
            + f"), held-out: colour {100 * sc['heldout colour']:.0f}%, shape {100 * sc['heldout shape']:.0f}%, "
            f"place (height and side both right) {100 * sc['heldout place']:.0f}%, all three "
            f"{100 * sc['heldout all three']:.1f}%. A prompt rewritten into the "
            "training grammar by these answers could hardly be drawn right more often."]
    for label, more in data.get("added", {}).items():
        sc = more["reading"]["chosen_scores"]
        lines += ["", f"{label} (its rows above: {more['cpu']}, {more['date']}, `python "
                  f"benchmarks/encoder_knowledge.py OUT.json --add {more['added']}`), asked to read the whole prompt "
                  "the same way: chosen per "
                  "attribute on dev, held-out colour "
                  f"{100 * sc['heldout colour']:.0f}%, shape {100 * sc['heldout shape']:.0f}%, place "
                  f"{100 * sc['heldout place']:.0f}%, all three {100 * sc['heldout all three']:.1f}% (dev: colour "
                  f"{100 * sc['dev colour']:.0f}%, shape {100 * sc['dev shape']:.0f}%, place "
                  f"{100 * sc['dev place']:.0f}%); each way:", "",
                  "| examples | calibrated | dev colour | shape | height | side | held-out colour | shape | height | "
                  "side |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for w in more["reading"]["ways"]:
            cells = [w[f"{split} {key}"] for split in ("dev", "heldout") for key in READ]
            lines.append(f"| {w['examples']} | {'yes' if w['calibrated'] else 'no'} | "
                         + " | ".join(f"{100 * v:.0f}%" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def add(out: Path, added: str) -> None:
    """Another language model's rows and reading, beside the file's (a rerun replaces its own)."""
    from encoder_probe import language_model

    import limner
    from limner.bench import cpu_name

    label, component = language_model(added)
    data = json.loads(out.read_text())
    enc = limner.create("text_encoders", **component)
    sets = word_sets()
    data["rows"] = [r for r in data["rows"] if r["encoder"] != label]
    rows = llm_rows(enc, sets, label)
    at = max(i for i, r in enumerate(data["rows"]) if r["encoder"] != "minilm") + 1  # after the other LLMs' rows
    data["rows"][at:at] = rows
    data.setdefault("added", {})[label] = {"added": added, "cpu": cpu_name(),
                                           "date": time.strftime("%Y-%m-%d"), "reading": reading(enc)}
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(render(data))


def main() -> None:
    from limner.bench import cpu_name
    from limner.plugins.llama import smollm2

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "encoder-knowledge.json"
    if sys.argv[2:3] == ["--add"] and len(sys.argv) == 4:
        return add(out, sys.argv[3])
    if sys.argv[2:]:
        sys.exit("usage: encoder_knowledge.py OUT.json [--add ENCODER (a text encoder's name or a .gguf path)]")
    sets = word_sets()
    counts = ", ".join(f"{key}: {len(s['dev'])} dev and {len(s['heldout'])} held-out" for key, s in sets.items())
    enc = smollm2()  # loaded once for every use
    data = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "counts": counts,
            "rows": [*llm_rows(enc, sets), minilm_row(sets)], "rewrites": rewrites(enc),
            "lists": word_lists(enc, sets), "reading": reading(enc)}
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
