"""Training: exact resume, atomic checkpoints, multi-process agreement, and the pipeline."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import limner
from limner.checkpoint import find_checkpoint
from limner.cli import main
from limner.recipes import train

TINY = """
out = "{out}"
recipe = "diffusion"
seed = 3
[data]
dataset = {{ name = "shapes", size = 32, length = 256, max_objects = 1 }}
batch_size = 4
[model]
text_encoder = {{ name = "bert", dim = 16, layers = 1, heads = 2, max_length = 48 }}
denoiser = {{ name = "dit", dim = 32, depth = 1, patch = 8, heads = 2 }}
[train]
steps = {steps}
lr = 1e-3
warmup = 2
log_every = 1
sample_every = 100
checkpoint_every = 2
[sample]
sampler = "dpmpp_2m"
schedule = "karras"
steps = 3
prompts = ["a red circle at the top left", "a blue square at the center"]
[eval]
metric = "shapes_attributes"
dataset = {{ name = "shapes", size = 32, split = "test", max_objects = 1, length = 8 }}
"""


def write_config(tmp_path, name="run", steps=4):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(out=(tmp_path / name).as_posix(), steps=steps))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = find_checkpoint(run)
    return {
        **load_file(ckpt / "model.safetensors"),
        **{f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()},
    }


def test_resume_after_a_stop_is_exact(tmp_path):
    straight = train(write_config(tmp_path, "straight", steps=4))
    assert straight.step == 4
    interrupted = write_config(tmp_path, "interrupted", steps=4)
    train(interrupted, {"train.steps": 2})  # "killed" after the checkpoint at step 2
    resumed = train(interrupted)
    assert resumed.step == 4
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "interrupted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [
        json.loads(line)["loss"] for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [
        json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_unet_run_trains_through_winograd_and_resumes_exactly(tmp_path, monkeypatch):
    """The diffusion recipe turns its model's convolutions into KernelConv2d: a UNet's float32 3x3
    ones train by WinogradConv2d (kernels/cpu_winograd.py: forward and input gradient), and a run
    stopped at its checkpoint and resumed ends with the straight run's weights, bit for bit."""
    from limner.kernels import cpu_winograd

    if cpu_winograd.KERNEL.module() is None:
        pytest.skip(f"limner's Winograd convolution is not available here: {cpu_winograd.KERNEL.failure}")
    calls = []
    apply = cpu_winograd.WinogradConv2d.apply
    monkeypatch.setattr(cpu_winograd.WinogradConv2d, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    dit = 'denoiser = {{ name = "dit", dim = 32, depth = 1, patch = 8, heads = 2 }}'
    unet = ('denoiser = {{ name = "unet", channels = 8, mults = [1, 2], blocks = 1, attention_levels = [1], '
            'heads = 2, groups = 4 }}')
    assert dit in TINY

    def config(name: str):
        path = tmp_path / f"{name}.toml"
        path.write_text(TINY.replace(dit, unet).format(out=(tmp_path / name).as_posix(), steps=4))
        return path

    trainer = train(config("straight"))
    assert any(isinstance(m, limner.nn.KernelConv2d) for m in trainer.model.denoiser.modules())
    assert calls and all(shape[1] >= 8 for shape in calls)  # the 3-channel input convolution stays on oneDNN
    interrupted = config("interrupted")
    train(interrupted, {"train.steps": 2})
    train(interrupted)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "interrupted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_carries_the_files_its_model_reads(tmp_path):
    """A text encoder read from a folder outside the run (bert's path = a saved model, as gguf_llm's
    path = a GGUF file): each checkpoint carries it in files/ (hard links here, one file system),
    its config names it there, and `limner sample` and `limner export` work from the checkpoint
    alone, though load_pipeline reads no path outside a checkpoint."""
    from limner.checkpoint import export_checkpoint, is_checkpoint

    saved = tmp_path / "models" / "my-bert"
    limner.create("text_encoders", "bert", dim=16, layers=1, heads=2, max_length=48).save(saved)
    config = write_config(tmp_path, steps=4)  # checkpoints at steps 2 and 4
    config.write_text(config.read_text().replace(
        'text_encoder = { name = "bert", dim = 16, layers = 1, heads = 2, max_length = 48 }',
        f'text_encoder = {{ name = "bert", path = "{saved.as_posix()}", freeze = true }}'))
    train(config)
    ckpt = find_checkpoint(tmp_path / "run")
    assert 'path = "files/my-bert"' in (ckpt / "config.toml").read_text()
    assert json.loads((ckpt / "state.json").read_text())["attachments"] == ["my-bert"]
    for name in ("config.json", "model.safetensors"):
        assert (ckpt / "files" / "my-bert" / name).stat().st_ino == (saved / name).stat().st_ino
    assert is_checkpoint(ckpt)
    first = tmp_path / "run" / "checkpoints" / "step_0000002" / "files" / "my-bert" / "model.safetensors"
    assert ckpt.name == "step_0000004" and first.stat().st_ino == (saved / "model.safetensors").stat().st_ino
    main(["sample", str(tmp_path / "run"), "-p", "a red circle", "--steps", "2", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "000-a-red-circle.png").is_file()
    export_checkpoint(tmp_path / "run", tmp_path / "release")
    assert sorted(p.name for p in (tmp_path / "release" / "files" / "my-bert").iterdir()) == [
        "config.json", "model.safetensors"]
    import shutil

    shutil.rmtree(saved)  # the original gone: the release still loads
    pipe = limner.load_pipeline(tmp_path / "release")
    assert pipe.generate(["a red circle"], steps=2).shape[0] == 1
    # a stranger's state.json cannot list files outside files/, nor pass a folder with unlisted ones
    state = json.loads((tmp_path / "release" / "state.json").read_text())
    (tmp_path / "release" / "state.json").write_text(json.dumps({**state, "attachments": ["../state.json"]}))
    assert not is_checkpoint(tmp_path / "release")
    # nor can its config read a file outside the checkpoint, by an absolute path or by '..'
    config_toml = tmp_path / "release" / "config.toml"
    for outside in (saved.parent.as_posix(), "../files"):
        config_toml.write_text(config_toml.read_text().replace('path = "files/my-bert"', f'path = "{outside}"'))
        with pytest.raises(limner.LimnerError, match="outside the checkpoint folder"):
            limner.load_pipeline(tmp_path / "release")
        config_toml.write_text(config_toml.read_text().replace(f'path = "{outside}"', 'path = "files/my-bert"'))


def test_a_copied_attachment_is_copied_once_per_run(tmp_path, monkeypatch):
    """Where a hard link cannot be made (the model on another file system), the first checkpoint
    copies the file and the later ones link to that copy, not copy it again."""
    import os

    import limner.checkpoint as checkpoint

    saved = tmp_path / "models" / "my-bert"
    limner.create("text_encoders", "bert", dim=16, layers=1, heads=2, max_length=48).save(saved)
    real_link = os.link

    def no_link_from_models(src, dst):
        if str(src).startswith(str(saved)):
            raise OSError(18, "Invalid cross-device link")
        real_link(src, dst)

    monkeypatch.setattr(checkpoint.os, "link", no_link_from_models)
    config = write_config(tmp_path, steps=6)  # checkpoints at steps 2, 4 and 6
    config.write_text(config.read_text().replace(
        'text_encoder = { name = "bert", dim = 16, layers = 1, heads = 2, max_length = 48 }',
        f'text_encoder = {{ name = "bert", path = "{saved.as_posix()}", freeze = true }}'))
    train(config)
    files = [tmp_path / "run" / "checkpoints" / f"step_{s:07d}" / "files" / "my-bert" / "model.safetensors"
             for s in (2, 4, 6)]
    inodes = {f.stat().st_ino for f in files}
    assert len(inodes) == 1 and (saved / "model.safetensors").stat().st_ino not in inodes  # one copy, linked on


def test_text_noise_moves_each_real_prompt_vector_by_its_share():
    from limner.plugins.diffusion_recipe import perturbed
    from limner.protocols import TextEmbedding

    torch.manual_seed(0)
    tokens = torch.randn(3, 5, 7) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    tokens = tokens * mask[..., None]
    cond = TextEmbedding(tokens, mask, torch.randn(3, 7))
    rows = torch.tensor([True, False, True])
    out = perturbed(cond, 0.25, rows)
    moved = (out.tokens - tokens).norm(dim=-1)
    assert torch.allclose(moved[rows][mask[rows]], 0.25 * tokens[rows][mask[rows]].norm(dim=-1), rtol=1e-5)
    assert torch.equal(out.tokens[1], tokens[1]) and torch.equal(out.pooled[1], cond.pooled[1])
    assert torch.equal(out.tokens[~mask], torch.zeros_like(out.tokens[~mask]))  # padding stays zero
    assert torch.allclose((out.pooled - cond.pooled).norm(dim=-1)[rows], 0.25 * cond.pooled[rows].norm(dim=-1))
    again = perturbed(cond, 0.25, rows)
    assert not torch.equal(again.tokens, out.tokens)  # a fresh direction each call (each step)


def test_text_noise_trains_differently_and_resumes_exactly(tmp_path):
    noisy = {"train.text_noise": 0.5}
    plain = train(write_config(tmp_path, "plain", steps=4))
    straight = train(write_config(tmp_path, "straight", steps=4), noisy)
    interrupted = write_config(tmp_path, "interrupted", steps=4)
    train(interrupted, {**noisy, "train.steps": 2})
    train(interrupted, noisy)
    a, b, c = (weights(tmp_path / n) for n in ("straight", "interrupted", "plain"))
    assert plain.step == straight.step == 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoints_are_atomic_and_corruption_is_named(tmp_path):
    run = tmp_path / "run"
    train(write_config(tmp_path, steps=2))
    ckpt = find_checkpoint(run)
    assert ckpt.name == "step_0000002" and not list(ckpt.parent.glob(".*tmp*"))
    (ckpt / "ema.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(limner.LimnerError, match="corrupt checkpoint file .*ema.safetensors"):
        limner.load_pipeline(run)
    with pytest.raises(limner.LimnerError, match="no checkpoint found at"):
        limner.load_pipeline(tmp_path / "nowhere")


def test_a_changed_model_config_refuses_to_resume(tmp_path):
    config = write_config(tmp_path, steps=2)
    train(config)
    config.write_text(config.read_text().replace("depth = 1", "depth = 2").replace("steps = 2", "steps = 4"))
    with pytest.raises(limner.LimnerError, match="different \\[model\\] config"):
        train(config)


def test_two_processes_end_with_identical_weights(tmp_path, train_two_ranks):
    """Also: the ranks leave without Python's teardown (cli.leave_without_teardown) only after the
    run's last work: rank 0's held-out scores printed once and written."""
    config = write_config(tmp_path, steps=3)
    config.write_text(config.read_text().replace("[eval]\n", "[eval]\nprompts = 4\n"))
    ranks = train_two_ranks(config, tmp_path, port=29517)
    assert ranks["step"] == 3 and len(ranks["digests"]) == 2
    assert ranks["digests"][0] == ranks["digests"][1]
    assert ranks["stdout"].count("held-out scores: ") == 1, ranks["stdout"]
    assert (tmp_path / "run" / "eval.json").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    train(write_config(tmp, steps=2))
    return tmp / "run"


def test_pipeline_same_seed_same_image(trained):
    pipe = limner.load_pipeline(trained)
    a = pipe(["a red circle at the top left"], seed=1, steps=4)
    b = pipe(["a red circle at the top left"], seed=1, steps=4)
    c = pipe(["a red circle at the top left"], seed=2, steps=4)
    assert a[0].size == (32, 32)
    assert a[0].tobytes() == b[0].tobytes() != c[0].tobytes()
    assert len(pipe("a blue square at the center", num=3, steps=2, sampler="euler_ancestral")) == 3


def test_pipeline_layouts_and_compile_draw_the_same_images(trained):
    """channels_last (the default) and a compiled, frozen denoiser change speed, not images."""
    images = {}
    for name, settings in {"contiguous": {"sample.channels_last": False}, "channels_last": {},
                           "compiled": {"sample.compile": True}}.items():
        pipe = load_with(trained, settings)
        images[name] = pipe.generate(["a red circle at the top left", "a blue square"], seed=1, steps=4)
    assert images["channels_last"].is_contiguous(memory_format=torch.channels_last)
    for name in ("channels_last", "compiled"):
        assert (images[name] - images["contiguous"]).abs().max() < 1e-4, name


def load_with(run: Path, settings: dict) -> "limner.plugins.diffusion_recipe.Pipeline":
    """The checkpoint's pipeline with [sample] settings changed, as a config edit would."""
    import dataclasses

    from limner.plugins.diffusion_recipe import Pipeline

    pipe = limner.load_pipeline(run)
    sample = dataclasses.replace(pipe.defaults, **{k.split(".", 1)[1]: v for k, v in settings.items()})
    return Pipeline(pipe.model, sample, pipe.device)


def test_a1111_names_pick_sampler_and_schedule(trained):
    pipe = limner.load_pipeline(trained)
    a = pipe.generate(["a red circle"], sampler="DPM++ 2M Karras", steps=3)
    b = pipe.generate(["a red circle"], sampler="dpmpp_2m", schedule="karras", steps=3)
    c = pipe.generate(["a red circle"], sampler="dpmpp_2m", schedule="exponential", steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(limner.LimnerError, match="the sampler name says schedule 'karras' but --schedule says"):
        pipe.generate(["a red circle"], sampler="DPM++ 2M Karras", schedule="exponential", steps=3)


def test_image_to_image_and_inpainting(trained):
    pipe = limner.load_pipeline(trained)
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    light = pipe(["x"], init_image=init, strength=0.05, steps=20, seed=0)[0]
    assert np.abs(np.asarray(light, dtype=float) - [200, 30, 30]).mean() < 12
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # redraw the left half only
    painted = np.asarray(pipe(["x"], init_image=init, mask=mask, steps=4)[0])
    assert (painted[:, 16:] == [200, 30, 30]).all()
    # the kept region's PSNR: exact outside the mask; image-to-image moves the whole image a little
    tensors = pipe.generate(["x"], init_image=init, mask=mask, steps=4)
    assert pipe.kept_psnr(tensors, init, mask) == float("inf")
    moved = pipe.kept_psnr(pipe.generate(["x"], init_image=init, strength=0.05, steps=20), init)
    redrawn = pipe.kept_psnr(pipe.generate(["x"], init_image=init, strength=1.0, steps=20), init)
    assert 15 < moved < 60 and redrawn < moved
    with pytest.raises(limner.LimnerError, match="no region is kept"):
        pipe.kept_psnr(tensors, init, Image.new("L", (32, 32), 255))
    with pytest.raises(limner.LimnerError, match="strength must be in \\(0, 1\\], got 1.5"):
        pipe(["x"], init_image=init, strength=1.5)


def test_sample_command_writes_images_and_grid(trained, tmp_path, capsys):
    """Files say which prompt made them (name, PNG text chunks, prompts.jsonl); the grid is labelled;
    a second run into the same folder numbers on and overwrites nothing."""
    main(["sample", str(trained), "-p", "a red circle at the top left", "-p", "A green square, at the top!",
          "--num", "2", "--steps", "3", "--sampler", "dpmpp_2m_sde", "--out", str(tmp_path / "o")])
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == [
        "000-a-red-circle-at-the-top-left.png", "001-a-red-circle-at-the-top-left.png",
        "002-a-green-square-at-the-top.png", "003-a-green-square-at-the-top.png", "grid-000.png", "prompts.jsonl"]
    meta = Image.open(out / "002-a-green-square-at-the-top.png").text
    assert meta["prompt"] == "A green square, at the top!" and json.loads(meta["limner"])["sampler"] == "dpmpp_2m_sde"
    record = json.loads((out / "prompts.jsonl").read_text())
    assert record["images"][3] == {"file": "003-a-green-square-at-the-top.png", "prompt": "A green square, at the top!",
                                   "image_of_prompt": 1}
    assert record["grid"] == "grid-000.png"
    assert Image.open(out / "grid-000.png").size[0] > 2 * 32 + 100  # a label column beside two tiles
    assert "Wrote 4 images (000-a-red-circle-at-the-top-left.png .. 003-a-green-square-at-the-top.png), grid-000.png" \
        in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".png"}
    main(["sample", str(trained), "-p", "a blue circle", "-p", "un cercle doré, élevé", "-p", "赤い円", "--steps", "2",
          "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    # accents dropped, not the letters; a prompt with no Latin letters is named "prompt"
    assert {"004-a-blue-circle.png", "005-un-cercle-dore-eleve.png", "006-prompt.png", "grid-004.png"} <= {
        p.name for p in out.iterdir()}
    runs = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["grid"] for r in runs] == ["grid-000.png", "grid-004.png"] and runs[1]["settings"]["steps"] == 2
    with pytest.raises(SystemExit):
        main(["sample", str(trained), "-p", "x", "--sampler", "eulr"])
    assert "unknown sampler 'eulr'" in capsys.readouterr().err


def test_compiled_training_keeps_names_and_matches_eager(tmp_path):
    """train.compile = true: torch.compile in place, so checkpoints keep their parameter names
    (no `_orig_mod.`) and the weights after two steps match eager training."""
    train(write_config(tmp_path, "eager", steps=2))
    train(write_config(tmp_path, "compiled", steps=2), {"train.compile": True})
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize("sampler", limner.list_components("samplers")["samplers"])
def test_same_prompt_same_seed_same_image_whatever_the_batch(trained, sampler):
    """Each image draws its noise (start and every ancestral/SDE step) from its own stream:
    a prompt alone, second in a batch, or as image 1 of --num 2 (= alone with seed + 1)."""
    pipe = limner.load_pipeline(trained)
    opts = dict(sampler=sampler, steps=3, seed=5)
    alone = pipe.generate(["a red circle at the top left"], **opts)
    batch = pipe.generate(["a much longer prompt: a small white square at the bottom right",
                           "a red circle at the top left"], **opts)
    assert (batch[1] - alone[0]).abs().max() < 1e-4
    two = pipe.generate(["a red circle at the top left"], num=2, **opts)
    shifted = pipe.generate(["a red circle at the top left"], **{**opts, "seed": 6})
    assert (two[0] - alone[0]).abs().max() < 1e-4 and (two[1] - shifted[0]).abs().max() < 1e-4
    assert (two[0] - two[1]).abs().max() > 1e-2  # different seeds, different images


def test_one_seed_per_prompt(trained):
    """evaluate() gives prompt k seed k: each prompt its own noise, the same in any batching."""
    pipe = limner.load_pipeline(trained)
    both = pipe.generate(["a red circle", "a blue square"], seed=[3, 9], steps=3)
    assert (both[1] - pipe.generate(["a blue square"], seed=9, steps=3)[0]).abs().max() < 1e-4
    assert (both[0] - pipe.generate(["a red circle"], seed=3, steps=3)[0]).abs().max() < 1e-4
    with pytest.raises(limner.LimnerError, match="1 seeds for 2 prompts"):
        pipe.generate(["a red circle", "a blue square"], seed=[3], steps=3)
