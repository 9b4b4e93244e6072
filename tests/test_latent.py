"""Latent diffusion trained here in its two stages, from the shipped configs (shortened): the
autoencoder recipe learns to reconstruct and sets its latents' statistics, then a diffusion run
on its latents learns, carries the autoencoder in its checkpoints and draws decoded images.
Full-length scores (the prompts followed): benchmarks/results/latent-shapes.md."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import limner
from limner.checkpoint import find_checkpoint
from limner.recipes import train

ROOT = Path(__file__).resolve().parents[1]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ae") / "run"
    train(ROOT / "configs" / "latent" / "shapes-autoencoder.toml",
          {"out": str(run), "train.steps": 80, "train.log_every": 10, "train.checkpoint_every": 80,
           "data.batch_size": 16, "eval.prompts": 64})
    return run


def test_the_autoencoder_learns_to_reconstruct_and_fits_its_latents(autoencoder):
    rows = rows_of(autoencoder)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], rows
    meta = json.loads((autoencoder / "autoencoder" / "autoencoder.json").read_text())
    scores = meta["scores"]
    # 80 steps: blurry but far from the 11 dB of a flat grey guess; shift and scale make the
    # held-out latents about unit variance
    assert scores["psnr"] > 15 and 0.7 < scores["latent_std"] < 1.3 and scores["latent_shape"] == [4, 8, 8], scores
    ae = limner.create("autoencoders", "autoencoder_kl", path=str(autoencoder / "autoencoder"))
    assert ae.scale == meta["options"]["scale"] and not any(p.requires_grad for p in ae.parameters())


def test_a_denoiser_learns_on_its_latents_and_draws_through_it(autoencoder, tmp_path):
    """The run's checkpoints hold the autoencoder (weights and shape, no path to its folder): the
    model loads and draws with the autoencoder's run gone. Prompts show in its drawings after
    about 1000 steps of the full configs (colour and position 100%, shape 82.5% on 200 held-out
    prompts: benchmarks/results/latent-shapes.md), far past a test's budget: here the loss falls."""
    stage_one = tmp_path / "stage-one"
    shutil.copytree(autoencoder / "autoencoder", stage_one)
    text = (ROOT / "configs" / "latent" / "shapes-latent-unet.toml").read_text()
    config = tmp_path / "latent.toml"
    text = text.replace('"runs/shapes-autoencoder/autoencoder"', json.dumps(str(stage_one)))
    # a smaller UNet than the config's (7.2M weights): the mechanics, in less time
    config.write_text(text.replace("channels = 64, mults = [1, 2], blocks = 2", "channels = 32, mults = [1, 2], "
                                   "blocks = 1"))
    run = tmp_path / "run"
    # ema 0: the checkpoint's weights are the trained ones (an EMA of 0.995 still averages in the
    # initial weights at 120 steps)
    train(config, {"out": str(run), "train.steps": 120, "train.log_every": 20, "train.sample_every": 120,
                   "train.checkpoint_every": 120, "data.batch_size": 16, "eval.prompts": 0, "train.ema": 0.0})
    rows = rows_of(run)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], rows
    weights = load_file(find_checkpoint(run) / "ema.safetensors")
    ae = load_file(stage_one / "model.safetensors")
    assert all(torch.equal(weights[f"autoencoder.{k}"], v) for k, v in ae.items())
    assert str(stage_one) not in (find_checkpoint(run) / "config.toml").read_text()
    shutil.rmtree(stage_one)
    pipe = limner.load_pipeline(run, device="cpu")
    assert pipe.model.latent == (4, 8, 8)
    red = pipe.generate(["a red circle at the top left"], steps=8, seed=0)
    assert red.shape == (1, 3, 32, 32) and bool(torch.isfinite(red).all())
    assert torch.equal(red, pipe.generate(["a red circle at the top left"], steps=8, seed=0))


def test_untrained_or_misnamed_autoencoders_are_refused(autoencoder, tmp_path):
    text = (ROOT / "configs" / "latent" / "shapes-latent-unet.toml").read_text()
    config = tmp_path / "random.toml"
    config.write_text(text.replace('path = "runs/shapes-autoencoder/autoencoder"',
                                   "widths = [32, 64, 64], blocks = 1, groups = 16"))
    with pytest.raises(limner.LimnerError, match="has no trained weights"):
        train(config, {"out": str(tmp_path / "r"), "train.steps": 2})
    with pytest.raises(limner.LimnerError, match="no trained autoencoder at .*nowhere"):
        limner.create("autoencoders", "autoencoder_kl", path=str(tmp_path / "nowhere"))
    with pytest.raises(limner.LimnerError, match="gives the autoencoder's shape and statistics; drop scale"):
        limner.create("autoencoders", "autoencoder_kl", path=str(autoencoder / "autoencoder"), scale=1.0)
