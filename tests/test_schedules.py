"""Schedules: shapes, endpoints, and each one's defining property."""
import math

import numpy as np
import pytest
import torch

import limner
from limner.noise import SigmaTable, ddpm_sigmas

NAMES = limner.list_components("schedules")["schedules"]


def make(name, n=10, lo=0.03, hi=14.6, **opts):
    return limner.create("schedules", name, **opts)(n, lo, hi)


@pytest.mark.parametrize("name", NAMES)
def test_every_schedule_descends_to_a_final_zero(name):
    sigmas = make(name, n=13)
    assert sigmas.dtype == torch.float64 and sigmas[-1] == 0
    # beta drops repeated timesteps; ddim_uniform's stride fits once more (ComfyUI's definition)
    assert len(sigmas) == 14 or name == "beta" or (name == "ddim_uniform" and len(sigmas) == 15)
    assert (sigmas[:-2] > sigmas[1:-1]).all()
    assert sigmas[0] <= 14.6 + 1e-9 or name.startswith("ddpm")
    assert sigmas[-2] >= 0.03 - 1e-9 or name.startswith("ddpm") or name == "linear_quadratic"  # a flow schedule


@pytest.mark.parametrize("name", ["karras", "exponential", "polyexponential", "linear", "normal"])
def test_endpoints_are_sigma_max_and_sigma_min(name):
    sigmas = make(name)
    assert float(sigmas[0]) == pytest.approx(14.6) and float(sigmas[-2]) == pytest.approx(0.03)


def test_karras_is_uniform_in_sigma_to_the_one_over_rho():
    steps = np.diff(make("karras", rho=7.0)[:-1].numpy() ** (1 / 7))
    assert np.allclose(steps, steps[0])
    assert torch.allclose(make("karras", rho=1.0), make("linear"))


def test_exponential_is_uniform_in_log_sigma_and_polyexponential_generalises_it():
    assert np.allclose(np.diff(np.log(make("exponential")[:-1].numpy())), math.log(0.03 / 14.6) / 9)
    assert torch.allclose(make("polyexponential", rho=1.0), make("exponential"))
    # rho > 1 spends more steps at low noise: its middle sigma is below exponential's
    assert make("polyexponential", rho=2.0)[5] < make("exponential")[5]


def test_sgm_uniform_is_normal_over_one_more_timestep_without_the_last():
    assert torch.allclose(make("sgm_uniform", n=10)[:-1], make("normal", n=11)[:-2])


def test_simple_takes_every_kth_entry_of_the_ddpm_table_from_the_top():
    table = ddpm_sigmas("scaled_linear")
    sigmas = make("simple", n=10, table="scaled_linear")
    assert torch.equal(sigmas[:-1], table.flip(0)[::100])


def test_beta_puts_more_steps_near_both_ends():
    table = SigmaTable.named("loglinear", 0.03, 14.6)
    t = table.timestep(make("beta", n=20)[:-1]).numpy()
    gaps = -np.diff(t)
    assert gaps[0] < gaps[len(gaps) // 2] and gaps[-1] < gaps[len(gaps) // 2]


def test_ddpm_sigmas_follow_the_closed_forms():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    assert np.allclose(ddpm_sigmas("linear").numpy(), np.sqrt((1 - abar) / abar))
    t = np.arange(1, 1001) / 1000
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    cosine = ddpm_sigmas("cosine").numpy()
    assert np.allclose(cosine[:900], np.sqrt((1 - f[:900]) / f[:900]), rtol=1e-9)  # no clipping there


def test_ddpm_schedules_keep_to_the_requested_range():
    sigmas = make("ddpm_linear", n=25, lo=0.1, hi=50.0)
    table = ddpm_sigmas("linear")
    inside = table[(table >= 0.1) & (table <= 50.0)]
    assert float(sigmas[0]) == float(inside[-1]) and float(sigmas[-2]) == float(inside[0])
    assert len(sigmas) == 26
    with pytest.raises(limner.LimnerError, match=r"no cosine DDPM timestep has sigma in \[1000.0, 2000.0\]"):
        make("ddpm_cosine", lo=1000.0, hi=2000.0)


def test_sigma_table_inverts():
    table = SigmaTable.named("cosine", 0.0, 0.0)
    t = torch.tensor([0.0, 3.25, 500.5, 998.9], dtype=torch.float64)
    assert torch.allclose(table.timestep(table.sigma(t)), t)


def test_bad_table_and_option_are_named():
    with pytest.raises(limner.LimnerError, match="unknown sigma table 'lin'. Valid: loglinear, linear"):
        make("simple", table="lin")
    with pytest.raises(limner.LimnerError, match="schedule 'karras': unknown option 'row', did you mean rho"):
        limner.create("schedules", "karras", row=7)


def test_vp_is_uniform_in_vp_time_and_matches_k_diffusion_on_its_range():
    beta_d, beta_min = 19.9, 0.1
    sigma_of = lambda t: math.sqrt(math.expm1(beta_d * t**2 / 2 + beta_min * t))  # noqa: E731 - Song et al. 2021
    sigmas = make("vp", n=11, lo=sigma_of(1e-3), hi=sigma_of(1.0))[:-1].numpy()
    expected = [sigma_of(t) for t in np.linspace(1.0, 1e-3, 11)]
    assert np.allclose(sigmas, expected, rtol=1e-9)
    try:  # k-diffusion, when its sampling module is importable here
        from k_diffusion.sampling import get_sigmas_vp
    except Exception:  # noqa: BLE001 - optional anchor (not installed in CI)
        return
    assert np.allclose(sigmas, get_sigmas_vp(11).double()[:-1].numpy(), rtol=1e-5)


def test_laplace_puts_log_sigma_at_laplace_quantiles():
    sigmas = make("laplace", n=9, lo=1e-3, hi=1e3, mu=0.5, beta=0.7)[:-1].numpy()
    p = 1 - np.linspace(0, 1, 9)
    quantile = 0.5 - 0.7 * np.sign(p - 0.5) * np.log(1 - 2 * np.abs(p - 0.5) + 1e-5)  # Laplace(mu, b)^-1(p)
    assert np.allclose(np.log(sigmas[1:-1]), quantile[1:-1])
    assert sigmas[0] == pytest.approx(1e3) and sigmas[-1] == pytest.approx(1e-3)  # the tails, clamped
    assert sigmas[4] == pytest.approx(math.exp(0.5), rel=1e-4)  # the median at mu


def test_kl_optimal_is_uniform_in_arctan_sigma():
    sigmas = make("kl_optimal")[:-1].numpy()
    assert np.allclose(np.diff(np.arctan(sigmas)), (math.atan(0.03) - math.atan(14.6)) / 9)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)


def test_align_your_steps_is_the_papers_table_at_its_own_range():
    from limner.plugins.schedules import AYS_TABLES

    table = AYS_TABLES["sd1"]
    ten = make("ays", n=10, lo=table[-1], hi=table[0])
    assert np.allclose(ten[:-1].numpy(), table[:-1]) and ten[-1] == 0  # last level replaced by 0
    twenty = make("align_your_steps", n=20, lo=table[-1], hi=table[0])[:-1].numpy()
    assert np.allclose(twenty[::2], table[:-1])  # log-linear interpolation keeps the table's points
    other = make("align_your_steps", n=10, lo=0.002, hi=80.0, model="sdxl")
    assert float(other[0]) == pytest.approx(80.0)
    with pytest.raises(limner.LimnerError, match="unknown model 'sd3'; valid: sd1, sdxl, svd"):
        make("align_your_steps", model="sd3")


def test_ddim_uniform_strides_the_table_from_its_second_entry():
    table = SigmaTable.named("linear", 0.03, 14.6).sigmas  # 1000 DDPM sigmas, ascending
    sigmas = limner.create("schedules", "ddim_uniform", table="linear")(6, 0.03, 14.6)
    assert torch.equal(sigmas[:-1], table[[997, 831, 665, 499, 333, 167, 1]].to(sigmas))  # 7 steps for 6, as ComfyUI


def test_linear_quadratic_is_linear_then_a_matching_quadratic_to_one():
    n, k, threshold = 12, 6, 0.025
    t = 1 - make("linear_quadratic", n=n, hi=1.0).numpy()  # time = 1 - sigma / sigma_max
    assert np.allclose(np.diff(t[: k + 1]), threshold / k)  # linear up to the threshold
    quad = np.polyfit(np.arange(k, n + 1), t[k:], 2)  # then one quadratic through the rest, ending at 1
    assert np.allclose(np.polyval(quad, np.arange(k, n + 1)), t[k:]) and t[-1] == 1
    assert np.polyval(np.polyder(quad), k) == pytest.approx(threshold / k)  # with the slope continuous
    assert make("linear_quadratic", n=1, hi=5.0).tolist() == [5.0, 0.0]
    with pytest.raises(limner.LimnerError, match="linear_steps must be in 1..11, got 12"):
        make("linear_quadratic", n=12, linear_steps=12)
