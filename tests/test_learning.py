"""configs/shapes-tiny.toml learns on a CPU: the loss falls and held-out prompts come out
in the right colour far more often than chance, within a small budget (~3 minutes)."""
import json
from pathlib import Path

from limner.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_tiny_learns_on_cpu(tmp_path):
    trainer = train(ROOT / "configs" / "shapes-tiny.toml", {
        "out": str(tmp_path / "run"), "train.steps": 250, "train.sample_every": 250,
        "train.checkpoint_every": 250, "eval.prompts": 48})
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.3 * losses[0], losses
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    # chance is 1/6 for colour (6 colours); measured 0.50 after 200 steps, 0.72 after 300
    assert scores["colour"] > 2 / 6, scores
    assert (tmp_path / "run" / "samples" / "step_0000250.png").is_file()
    assert trainer.step == 250
