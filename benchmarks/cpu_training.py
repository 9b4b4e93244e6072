"""Training speed and time-to-score of CPU runs, as committed results.

    python benchmarks/cpu_training.py runs/shapes-unet runs/shapes-dit ... \
        --note shapes-dit="..." --out benchmarks/results/cpu-training

For each run folder: its config's recipe and model, steps, training wall time (the
`train_seconds` its last checkpoint records: every step, sample grid and checkpoint of
fit()), steps/s, the first and last logged losses, and the held-out scores `limner train`
wrote to eval.json (or a `limner eval --out` report named eval.json). Writes JSON and a
rendered markdown table. With --curve, also scores every checkpoint each run kept
(`checkpoints/step_*`) on the same held-out prompts: time-to-score curves.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def run_row(run: Path, note: str = "") -> dict:
    from limner.checkpoint import find_checkpoint, read_state
    from limner.recipes import load_run_config

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
            f"first_{key}": _round(losses[0][key]), f"last_{key}": _round(losses[-1][key]),
            **{k: round(v, 3) for k, v in scores.items() if k in ("colour", "shape", "position", "all")},
            "eval_objects": int(scores.get("objects", 0)), "note": note}


def _round(value, digits: int = 4):
    return None if value is None else round(value, digits)


def curve(run: Path, prompts: int | None, steps_per_s: float | None) -> list[dict]:
    """Held-out scores of every checkpoint the run kept, with the training time it had taken
    (a checkpoint older than the train_seconds field: its step / the run's steps/s, marked ~)."""
    from limner.checkpoint import read_state
    from limner.recipes import evaluate_checkpoint

    points = []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        report = evaluate_checkpoint(ckpt, prompts)
        seconds = read_state(ckpt).get("train_seconds")
        minutes = round(seconds / 60, 2) if seconds else (
            f"~{report['step'] / steps_per_s / 60:.1f}" if steps_per_s else None)
        points.append({"step": report["step"], "train_minutes": minutes,
                       **{k: round(v, 3) for k, v in report["scores"].items() if k in ("colour", "shape", "position",
                                                                                        "all")}})
        print(f"{run.name} step {report['step']}: {points[-1]}", flush=True)
    return points


def render_curves(curves: dict[str, list[dict]]) -> str:
    lines = [
        "",
        "Time to score: every kept checkpoint on the same held-out prompts.",
        "",
        "| run | step | CPU minutes | colour | shape | position | all three |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run, points in curves.items():
        lines += [f"| {run} | {p['step']} | {p['train_minutes']} | {p.get('colour')} | {p.get('shape')} | "
                  f"{p.get('position')} | {p.get('all')} |" for p in points]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--curve", action="append", default=[], metavar="RUN",
                        help="Also score every kept checkpoint of the run folder named RUN (repeatable).")
    parser.add_argument("--curve-prompts", type=int, default=None, help="Held-out prompts per curve point.")
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cores": os.cpu_count(), "torch": torch.__version__}
    notes = dict(n.split("=", 1) for n in args.note)
    rows = [run_row(r, notes.get(r.name, "")) for r in args.runs]
    speed = {row["run"]: row.get("steps_per_s") for row in rows}
    curves = {r.name: curve(r, args.curve_prompts, speed[r.name]) for r in args.runs if r.name in args.curve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine, "runs": rows, **({"curves": curves} if curves else {})}
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    text = render(rows, machine) + (render_curves(curves) if curves else "")
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
