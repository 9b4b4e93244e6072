"""The `limner` command line: plugins listing, demo, and one-paragraph user errors."""
import json

import pytest
from PIL import Image

from limner.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def test_plugins_table_and_json(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "limner.samplers  (limner 0.1.0)" in out
    assert "dpmpp_2m_sde" in out
    code, out, _ = run(capsys, "plugins", "--json")
    rows = {r["plugin"]: r for r in json.loads(out)["plugins"]}
    assert "euler" in rows["limner.samplers"]["components"]["samplers"]
    assert rows["limner.schedules"]["version"] == "0.1.0"


def test_demo_without_a_checkpoint_samples_the_exact_denoiser(capsys, tmp_path):
    config = tmp_path / "demo.toml"
    config.write_text('samplers = ["euler", { name = "dpmpp_2m_sde", eta = 1.0 }]\nsteps = 12\nseeds = 3\n'
                      'images = 4\ncheckpoints = ["no/such/dir"]\nschedule = "karras"\n'
                      'dataset = { name = "shapes", length = 8 }\n')
    code, out, _ = run(capsys, "demo", "--config", str(config), "--out", str(tmp_path / "o"))
    assert code == 0
    assert "samplers            ddim, ddim_cfg_pp, ddpm" in out and "No checkpoint at 'no/such/dir'" in out
    grid = Image.open(tmp_path / "o" / "grid.png")
    assert grid.size[1] == 2 * (32 + 2) + 2  # two sampler rows
    rms = [float(line.split()[-1]) for line in out.splitlines() if line.strip().startswith(("euler", "dpmpp"))]
    assert len(rms) == 2 and max(rms) < 0.01  # every sample landed on a training image


def test_demo_draws_prompts_by_samplers_from_a_checkpoint(capsys, tmp_path):
    from test_train import write_config

    from limner.checkpoint import export_checkpoint
    from limner.recipes import train

    train(write_config(tmp_path, steps=2))
    export_checkpoint(tmp_path / "run", tmp_path / "release")
    assert {p.name for p in (tmp_path / "release").iterdir()} == {"config.toml", "ema.safetensors", "state.json"}
    assert not (tmp_path / "latest").exists()
    config = tmp_path / "demo.toml"
    config.write_text(
        f'samplers = ["euler", "dpmpp_2m"]\nsteps = 3\ncheckpoints = ["{(tmp_path / "release").as_posix()}"]\n'
        'schedule = "karras"\ndataset = "shapes"\neval_prompts = 4\n'
        'prompts = ["a red circle at the top", "a blue square at the left", "x"]\n'
        'paraphrases = ["a crimson disc up high", "a cobalt box on the west side"]\n'
    )
    code, out, _ = run(capsys, "demo", "--config", str(config), "--out", str(tmp_path / "o"))
    assert code == 0, out
    said = Image.open(tmp_path / "o" / "paraphrases.png")  # one row (the model), two prompts under a header
    assert 10 < said.size[1] - (96 + 2 + 2) < 60 and 2 * 96 < said.size[0] < 3 * 96 + 7 * 40, said.size
    assert "paraphrases.png (rows: models, columns: prompts in other words)" in out
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert [(r["recipe"], r["eval_prompts"]) for r in scores] == [("diffusion", 4)]
    assert 0 <= scores[0]["colour"] <= 1 and scores[0]["params_M"] > 0
    header = out[out.index("| model"):].splitlines()[0]
    assert all(k in header for k in ("params_M", "train_minutes", "seconds_per_image", "colour", "position"))
    grid = Image.open(tmp_path / "o" / "grid.png")
    header_height = grid.size[1] - (2 * (96 + 2) + 2)  # two sampler rows of 96-pixel tiles, then the prompts
    assert 10 < header_height < 40, grid.size


def test_user_errors_are_one_paragraph_and_exit_1(capsys, tmp_path):
    config = tmp_path / "demo.toml"
    config.write_text('samplers = ["eulr"]\nschedule = "karras"\ndataset = "shapes"\n')
    code, out, err = run(capsys, "demo", "--config", str(config))
    assert code == 1
    assert err.startswith("Error: ")
    assert "samplers[0].name: unknown sampler 'eulr'. Did you mean: euler" in err
    assert "Traceback" not in err


def test_eval_scores_a_checkpoint_from_the_command_line(capsys, tmp_path):
    from test_train import write_config

    from limner.recipes import train

    train(write_config(tmp_path, steps=2))  # its [eval]: shapes_attributes on 8 held-out prompts
    report_path = tmp_path / "report" / "eval.json"
    code, out, _ = run(capsys, "eval", str(tmp_path / "run"), "--prompts", "3", "--steps", "2", "--out",
                       str(report_path))
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["step"] == 2 and report["prompts"] == 3 and report["sampling"] == {"steps": 2}
    assert set(report["scores"]) >= {"colour", "shape", "position", "all", "seconds_per_image"}
    assert "colour" in out and "held-out prompts" in out
    code, _, err = run(capsys, "eval", str(tmp_path / "run"), "--prompts", "9")
    assert code == 1 and "eval prompts must be 1..8" in err and "Traceback" not in err
    code, _, err = run(capsys, "eval", str(tmp_path / "run"), "--prompts", "0")
    assert code == 2 and "--prompts" in err
