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
    assert len(sigmas) == 14 or name == "beta"  # beta drops repeated timesteps
    assert (sigmas[:-2] > sigmas[1:-1]).all()
    assert sigmas[-2] >= 0.03 - 1e-9 and sigmas[0] <= 14.6 + 1e-9 or name.startswith("ddpm")


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
