"""Training speed and time-to-score of CPU runs, as committed results.

    python benchmarks/cpu_training.py runs/shapes-unet runs/shapes-dit ... \
        --note shapes-dit="..." --out benchmarks/results/cpu-training

For each run folder: its config's recipe and model, steps, training wall time (the
`train_seconds` its last checkpoint records: every step, sample grid and checkpoint of
fit()), steps/s, the first and last logged losses, and the held-out scores `limner train`
wrote to eval.json (or a `limner eval --out` report named eval.json). Writes JSON and a
rendered markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def run_row(run: Path, note: str = "") -> dict:
    from limner.checkpoint import find_checkpoint, read_state
    from limner.train import load_run_config

    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint")
    state, cfg = read_state(ckpt), load_run_config(ckpt / "config.toml")
    model = cfg.model.denoiser if cfg.recipe == "diffusion" else cfg.model.generator
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    key = "loss" if "loss" in losses[0] else "g_loss"
    report = json.loads((run / "eval.json").read_text())
    scores = report.get("scores", report)
    seconds = state.get("train_seconds")
    return {"run": run.name, "recipe": cfg.recipe, "model": model.name,
            "text_encoder": cfg.model.text_encoder.name, "batch": cfg.data.batch_size, "steps": state["step"],
            "train_minutes": round(seconds / 60, 2) if seconds else None,
            "steps_per_s": round(state["step"] / seconds, 2) if seconds else None,
            f"first_{key}": round(losses[0][key], 4), f"last_{key}": round(losses[-1][key], 4),
            **{k: round(v, 3) for k, v in scores.items() if k in ("colour", "shape", "position", "all")},
            "eval_objects": int(scores.get("objects", 0)), "note": note}


def render(rows: list[dict], machine: dict) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"CPU training runs ({machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}); "
             "scores on held-out `shapes` prompts by `shapes_attributes`.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-training"))
    parser.add_argument("--note", action="append", default=[], metavar="RUN=TEXT",
                        help="A remark for the run folder named RUN (repeatable).")
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cores": os.cpu_count(), "torch": torch.__version__}
    notes = dict(n.split("=", 1) for n in args.note)
    rows = [run_row(r, notes.get(r.name, "")) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(rows, machine))
    print(render(rows, machine))


if __name__ == "__main__":
    main()
