"""The limner-diffusers example distribution, pip-installed into a folder on sys.path: limner's
samplers driving a diffusers UNet give diffusers' own scheduler loops' images."""
import subprocess
import sys

import pytest
import torch

import limner
from limner.protocols import TextEmbedding
from limner.registry import build_registry

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(ROOT / "examples" / "limner-diffusers")], check=True)
    sys.path.insert(0, str(site))
    try:
        import limner_diffusers

        yield limner_diffusers
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("limner_diffusers", None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random UNet2DConditionModel and an Euler scheduler config, saved as a pipeline folder."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4)
    unet.save_pretrained(folder / "unet")
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(
        folder / "scheduler")
    return folder


def inputs():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 8, 8, generator=gen)
    cond = TextEmbedding(torch.randn(2, 5, 12, generator=gen), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 12))
    return noise, cond


def test_registered_by_its_distribution(plugin):
    reg = build_registry([plugin], entry_points=False)
    assert "diffusers_unet" in reg.names("denoisers")


@torch.no_grad()
def test_limner_euler_is_diffusers_euler_discrete(plugin, model_dir):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    noise, cond = inputs()
    sched = EulerDiscreteScheduler.from_pretrained(model_dir / "scheduler", use_karras_sigmas=True)
    sched.set_timesteps(STEPS)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(latents, t), t, encoder_hidden_states=cond.tokens,
                   encoder_attention_mask=cond.mask).sample
        latents = sched.step(eps, t, latents).prev_sample
    denoiser = plugin.diffusers_unet(str(model_dir))
    sigmas = sched.sigmas.double()
    ours = limner.create("samplers", "euler")(denoiser, noise * float(sigmas[0]), sigmas, extra_args={"cond": cond})
    assert (ours - latents).abs().max() < 1e-4  # NOTE: measured 1.7e-5 (float32)
    assert latents.abs().max() > 0.1  # a real image, not a collapse to zero


@torch.no_grad()
def test_limner_dpmpp_2m_is_diffusers_dpm_solver_multistep_with_karras_sigmas(plugin, model_dir):
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    noise, cond = inputs()
    sched = DPMSolverMultistepScheduler.from_pretrained(model_dir / "scheduler", use_karras_sigmas=True,
                                                        algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(STEPS)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    latents = noise * sched.init_noise_sigma  # diffusers' DPM-Solver works on x / sqrt(1 + sigma^2)
    for t in sched.timesteps:
        eps = unet(latents, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask).sample
        latents = sched.step(eps, t, latents).prev_sample
    # it feeds Karras sigmas to the UNet as whole timesteps: round_timesteps
    denoiser = plugin.diffusers_unet(str(model_dir), round_timesteps=True)
    sigmas = sched.sigmas.double()
    start = noise * float((1 + sigmas[0] ** 2).sqrt())  # the same start, in limner's x = x0 + sigma * eps
    ours = limner.create("samplers", "dpmpp_2m")(denoiser, start, sigmas, extra_args={"cond": cond})
    assert (ours - latents).abs().max() < 1e-4  # NOTE: measured 3.1e-5 (float32)
    unrounded = plugin.diffusers_unet(str(model_dir))  # the rounding is what tells the two apart
    off = limner.create("samplers", "dpmpp_2m")(unrounded, start, sigmas, extra_args={"cond": cond})
    assert (off - latents).abs().max() > 1e-3  # measured 0.12


def test_bad_folder_and_mismatched_config_are_named(plugin, model_dir, tmp_path):
    with pytest.raises(limner.LimnerError, match="holds no diffusers UNet with a scheduler config"):
        plugin.diffusers_unet(str(tmp_path))
    with pytest.raises(limner.LimnerError, match="the model's context_dim is 12, the config asks for 384"):
        plugin.diffusers_unet(str(model_dir), context_dim=384)
    denoiser = plugin.diffusers_unet(str(model_dir))
    assert denoiser.state_dict() == {}  # pretrained weights stay out of limner checkpoints
    with pytest.raises(limner.LimnerError, match="does not train"):
        denoiser.loss()
