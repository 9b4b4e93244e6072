"""Nothing lost, nothing silent: non-finite training, bad settings, I/O errors, resumes and
outputs. Each test is a finding of issue 13 (commit aba6118) that failed there."""
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import TINY, write_config

import limner
from limner.checkpoint import find_checkpoint
from limner.cli import main
from limner.recipes import train


def strict_rows(path):
    """metrics.jsonl parsed as strict JSON (NaN and Infinity are not JSON)."""
    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def finite_checkpoint(run):
    ckpt = find_checkpoint(run)
    for name in ("model", "ema"):
        for key, t in load_file(ckpt / f"{name}.safetensors").items():
            assert torch.isfinite(t).all(), (name, key)
    return ckpt


def test_a_diverging_run_skips_then_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    """lr = 1e30: the loss turns NaN within steps. The run skips those steps, stops by itself
    after train.max_nonfinite in a row naming the step, every checkpoint it leaves is finite,
    `latest` points at one, and metrics.jsonl stays strict JSON."""
    path = write_config(tmp_path, "nan", steps=40)
    # max_weight_growth off: this is the NaN guard's test (the divergence watch would stop it first)
    path.write_text(path.read_text().replace("lr = 1e-3", "lr = 1e30\nmax_nonfinite = 3\nmax_weight_growth = 1e300"))
    with pytest.raises(limner.LimnerError, match=r"training stopped at step \d+: .*3 non-finite updates in a row"):
        train(path)
    ckpt = finite_checkpoint(tmp_path / "nan")
    rows = strict_rows(tmp_path / "nan" / "metrics.jsonl")
    assert any(r["skipped"] > 0 for r in rows)
    assert json.loads((ckpt / "state.json").read_text())["step"] < 40


def test_the_stop_policy_stops_at_the_first_bad_step(tmp_path):
    path = write_config(tmp_path, "stop", steps=40)
    path.write_text(path.read_text().replace("lr = 1e-3", "lr = 1e30\nnonfinite = \"stop\"\nmax_weight_growth = 1e300"))
    with pytest.raises(limner.LimnerError, match=r"1 non-finite update in a row, policy 'stop'"):
        train(path)
    bad = write_config(tmp_path, "typo", steps=2)
    bad.write_text(bad.read_text().replace("lr = 1e-3", "lr = 1e-3\nnonfinite = \"ignore\""))
    with pytest.raises(limner.LimnerError, match="train.nonfinite must be one of skip, stop, got 'ignore'"):
        train(bad)


def test_a_diverging_gan_skips_its_bad_updates_and_stops(tmp_path):
    from test_gan import gan_config

    path = gan_config(tmp_path, "gan-nan", steps=40, lr=1e30)
    path.write_text(
        path.read_text().replace("d_lr = 2e-3", "d_lr = 1e30\nmax_nonfinite = 3\nmax_weight_growth = 1e300")
    )
    with pytest.raises(limner.LimnerError, match=r"training stopped at step \d+: .*3 non-finite updates in a row"):
        train(path)
    strict_rows(tmp_path / "gan-nan" / "metrics.jsonl")
    ckpt = find_checkpoint(tmp_path / "gan-nan")
    if ckpt is not None:  # whatever was written holds finite weights only
        for f in ckpt.glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(f).values() if t.is_floating_point()), f


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from limner.checkpoint import write_checkpoint

    good = {"model": {"w": torch.ones(3)}}
    write_checkpoint(tmp_path / "checkpoints" / "step_1", good, "", {"step": 1})
    with pytest.raises(limner.LimnerError, match=r"not writing .*step_2: 1 tensors hold NaN or infinite values "
                                                 r"\(model: w\)"):
        write_checkpoint(tmp_path / "checkpoints" / "step_2", {"model": {"w": torch.tensor([1.0, math.nan])}}, "",
                         {"step": 2})
    assert find_checkpoint(tmp_path).name == "step_1"
    assert not (tmp_path / "checkpoints" / "step_2").exists()


BAD_CONFIG_VALUES = [
    ("[data]\n", "batch_size = 0", "data.batch_size: must be >= 1, got 0"),
    ("[data]\n", "batch_size = -4", "data.batch_size: must be >= 1, got -4"),
    ("[train]\n", "steps = 0", "train.steps: must be >= 1, got 0"),
    ("[train]\n", "ema = 1.5", "train.ema: must be >= 0 and < 1, got 1.5"),
    ("[train]\n", "checkpoint_every = 0", "train.checkpoint_every: must be >= 1, got 0"),
    ("[train]\n", "grad_clip = nan", "train.grad_clip: must be a finite number, got nan"),
    ("[sample]\n", "guidance = inf", "sample.guidance: must be a finite number, got inf"),
    ("[sample]\n", "guidance = -1.0", "sample.guidance: must be >= 0, got -1.0"),
    ("[model]\n", "image_size = 0", "model.image_size: must be >= 1 and <= 4096, got 0"),
]


@pytest.mark.parametrize("section,new,message", BAD_CONFIG_VALUES)
def test_every_bad_setting_is_named_with_its_range_before_training_starts(tmp_path, capsys, section, new, message):
    """One paragraph on stderr, exit 1, no traceback, nothing written (the run folder is not created)."""
    text = TINY.format(out=(tmp_path / "run").as_posix(), steps=4)
    key = new.split(" =")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))  # no duplicate key
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(section, section + new + "\n", 1))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_cli_override_gets_the_same_checks(tmp_path):
    with pytest.raises(limner.LimnerError, match="train.steps: must be >= 1, got 0"):
        train(write_config(tmp_path), {"train.steps": 0})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    train(write_config(tmp, steps=2))
    return tmp / "run"


BAD_SAMPLE_OPTIONS = [
    (["--guidance", "nan"], "'nan' is not a finite number"),
    (["--guidance", "inf"], "'inf' is not a finite number"),
    (["--guidance", "-2"], "-2 is not >= 0"),
    (["--steps", "0"], "0 is not in the range 1<=x<=10000"),
    (["--num", "0"], "0 is not in the range 1<=x<=1000"),
    (["--strength", "0.5"], "--strength sets how much of --init-image is redrawn"),
    (["--strength", "0"], "0 is not > 0 and <= 1"),
    (["--truncation", "nan"], "'nan' is not a finite number"),
    (["--sampler", "eulr"], "unknown sampler 'eulr'"),
    (["-p", " "], "--prompt is empty"),
    (["--sigmas", "3,5,0"], "sigmas must be two or more finite numbers >= 0, strictly falling"),
    (["--sigmas", "3,x"], "--sigmas takes comma-separated numbers"),
    (["--sigmas", "3,1,0"], "sigmas are the whole schedule: give them, or a schedule and steps, not both"),
]


@pytest.mark.parametrize("extra,message", BAD_SAMPLE_OPTIONS)
def test_bad_sample_options_fail_before_anything_is_written(run, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(run), "-p", "a red circle", "--steps", "2", *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and message in err and "Traceback" not in err
    assert not out.exists()


def test_an_unwritable_out_fails_before_sampling(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        main(["sample", str(run), "-p", "a red circle", "--out", str(blocker / "samples")])
    assert f"cannot write to {blocker / 'samples'}: {blocker} is a file, not a folder" in capsys.readouterr().err
    bad = write_config(tmp_path, "unwritable")
    bad.write_text(bad.read_text().replace(f'out = "{(tmp_path / "unwritable").as_posix()}"',
                                           f'out = "{(blocker / "run").as_posix()}"'))
    with pytest.raises(limner.LimnerError, match="is a file, not a folder"):
        train(bad)


def test_mask_and_init_image_sizes_are_checked_and_crops_are_explicit(run):
    pipe = limner.load_pipeline(run)
    init = Image.new("RGB", (64, 32), (200, 30, 30))
    with pytest.raises(limner.LimnerError, match="the mask is 32x32 but the init image is 64x32"):
        pipe(["x"], init_image=init, mask=Image.new("L", (32, 32), 255), steps=2)
    wide = Image.new("RGB", (96, 32), (0, 0, 255))
    wide.paste((200, 30, 30), (32, 0, 64, 32))  # red square in the middle, blue at the sides
    light = pipe(["x"], init_image=wide, strength=0.05, steps=20)[0]
    import numpy as np

    assert abs(np.asarray(light, dtype=float)[..., 0].mean() - 200) < 25  # the middle, not a squashed mix


def test_a_checkpoint_of_another_size_gets_one_paragraph(run, tmp_path):
    import shutil

    from limner.recipes import load_pipeline

    copy = tmp_path / "edited"
    shutil.copytree(find_checkpoint(run), copy)
    config = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(config.replace("dim = 32", "dim = 48", 1))
    with pytest.raises(limner.LimnerError) as err:
        load_pipeline(copy)
    msg = str(err.value)
    assert "does not fit this model:" in msg and "tensors have other shapes" in msg
    assert "Likely cause: the config beside the weights was edited" in msg
    assert msg.count("\n") == 0 and len(msg) < 800


def test_stale_temp_folders_of_killed_writers_go_and_resumes_log_each_step_once(tmp_path):
    path = write_config(tmp_path, "resumed", steps=4)
    train(path, {"train.steps": 2})
    run = tmp_path / "resumed"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / "checkpoints" / f".step_0000003.tmp{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with (run / "metrics.jsonl").open("a") as f:  # what a run killed after step 3 had logged
        f.write(json.dumps({"step": 3, "loss": 0.5, "lr": 0.001}) + "\n")
    train(path)
    assert not stale.exists()
    assert [r["step"] for r in strict_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_explicit_sigmas_are_a_schedule(run):
    """--sigmas replaces schedule + steps: the karras sigmas written out give the karras image."""
    pipe = limner.load_pipeline(run)
    karras = limner.create("schedules", "karras")(4, 0.002, 80.0).tolist()
    by_name = pipe.generate(["a red circle"], schedule="karras", steps=4, sampler="euler")
    by_hand = pipe.generate(["a red circle"], sigmas=karras, sampler="euler")
    assert torch.allclose(by_name, by_hand, atol=1e-6)
    assert (pipe.generate(["a red circle"], sigmas=karras[:3] + [0.0], sampler="euler") - by_hand).abs().max() > 1e-3


def test_cfg_pp_with_a_mask_is_refused_not_ignored(run):
    pipe = limner.load_pipeline(run)
    init, mask = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("L", (32, 32), 255)
    with pytest.raises(limner.LimnerError, match="euler_cfg_pp \\(CFG\\+\\+\\) does not combine with --mask yet; "
                                                 "inpaint with euler instead"):
        pipe(["x"], init_image=init, mask=mask, sampler="euler_cfg_pp", steps=2)


def test_every_recipe_pipeline_shares_the_one_base_and_its_checks(run):
    """Prompt expansion, per-image seeds and option refusal live once, in PipelineBase."""
    from limner.pipeline import PipelineBase
    from limner.registry import create

    drawing = [name for name in limner.list_components()["recipes"] if create("recipes", name).pipeline is not None]
    assert {"diffusion", "gan", "vae"} <= set(drawing)  # the captioner, matcher and feature_net recipes draw none
    for name in drawing:
        assert issubclass(create("recipes", name).pipeline, PipelineBase), name
    pipe = limner.load_pipeline(run)
    for num in (0, 1.5, True):
        with pytest.raises(
            limner.LimnerError, match=rf"num \(images per prompt\) must be a whole number >= 1, got {num!r}"
        ):
            pipe.generate("a red circle", num=num, steps=2)
    with pytest.raises(limner.LimnerError, match="truncation does not apply here: truncation is for GAN and VAE"):
        pipe.generate("a red circle", truncation=0.7, steps=2)
    assert PipelineBase.expand(["a", "b"], 2) == ["a", "a", "b", "b"] and PipelineBase.expand("a", 1) == ["a"]
