"""Two-object `shapes` attempts as a committed results file: every kept checkpoint of a run
scored on the first held-out two-object prompts, rendered with the earlier attempts.

    python benchmarks/two_object.py --add runs/shapes2-unet-layout --what "..." --note "..."
    python benchmarks/two_object.py          # re-render benchmarks/results/cpu-two-object.md

The JSON keeps each run's points (step, CPU minutes of training, colour/shape/position/all);
the markdown table is written from it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path("benchmarks/results/cpu-two-object")
KEYS = ("colour", "shape", "position", "all")


def points(run: Path, prompts: int) -> list[dict]:
    """Scores of every checkpoint the run kept, with the training minutes it had taken."""
    from limner.checkpoint import read_state
    from limner.recipes import evaluate_checkpoint

    out = []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        report = evaluate_checkpoint(ckpt, prompts)
        seconds = read_state(ckpt).get("train_seconds")
        out.append({"step": report["step"], "train_minutes": round(seconds / 60, 1) if seconds else None,
                    **{k: round(report["scores"][k], 3) for k in KEYS}})
        print(f"{run.name}: {out[-1]}", flush=True)
    return out


def percent(v) -> str:
    return "" if v is None else f"{100 * v:g}%"


def render(data: dict) -> str:
    lines = [f"Two-object `shapes` scenes: attempts at binding each object's colour and shape to its place, on the "
             f"2-core CPU. Scores: `{data['command']}`, {data['metric']}. Target: {data['target']}.", "",
             "| run | what changed | step | CPU minutes | colour | shape | position | all three | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for run in data["runs"]:
        for i, p in enumerate(run["points"]):
            last = i == len(run["points"]) - 1
            lines.append(f"| {run['run'] if i == 0 else ''} | {run['what'] if i == 0 else ''} | {p['step']} | "
                         f"{p.get('train_minutes') or ''} | " + " | ".join(percent(p.get(k)) for k in KEYS)
                         + f" | {run.get('note', '') if last else ''} |")
    return "\n".join(lines) + "\n\n" + data.get("summary", "") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=Path, help="a run folder whose checkpoints to score and add (or replace)")
    parser.add_argument("--what", default="", help="what the run changed")
    parser.add_argument("--note", default="", help="a remark shown on the run's last row")
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args()
    data = json.loads(RESULTS.with_suffix(".json").read_text())
    if args.add:
        row = {"run": args.add.name, "what": args.what, "points": points(args.add, args.prompts), "note": args.note}
        data["runs"] = [r for r in data["runs"] if r["run"] != row["run"]] + [row]
        RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
