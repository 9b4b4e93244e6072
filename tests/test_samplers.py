"""Samplers against exact answers: on Gaussian data N(mu, s^2) the optimal denoiser is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE keeps
(x - mu) / sqrt(s^2 + sigma^2) constant, so every solver's error and order can be measured."""
import pathlib
import re

import numpy as np
import pytest
import torch

import limner
from limner.sampling import Guided, sample

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
S = torch.tensor([0.5, 1.2], dtype=torch.float64)


def gaussian_denoiser(x, sigma, **_):
    s2 = S**2
    return MU + s2 / (s2 + sigma[:, None] ** 2) * (x - MU)


def consistency_function(x, sigma, **_):
    """The exact consistency map of the Gaussian: the ODE solution at sigma = 0."""
    return MU + (x - MU) * S / torch.sqrt(S**2 + sigma[:, None] ** 2)


def exact_flow(x, sigma_from, sigma_to):
    return MU + (x - MU) * torch.sqrt(S**2 + sigma_to**2) / torch.sqrt(S**2 + sigma_from**2)


def convergence_order(fn, steps=(16, 32, 64, 128), sigma_min=0.05, sigma_max=20.0):
    """Slope of log(max error) against log(steps) on karras sigmas ending at sigma_min."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    karras = limner.create("schedules", "karras")
    errors = []
    for n in steps:
        sigmas = karras(n + 1, sigma_min, sigma_max)[:-1]  # n steps, no final jump to 0
        out = fn(gaussian_denoiser, x.clone(), sigmas)
        errors.append((out - exact_flow(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


DETERMINISTIC = [  # (name, options, known order)
    ("euler", {}, 1),
    ("euler_ancestral", {"eta": 0.0}, 1),
    ("ddim", {}, 1),
    ("heun", {}, 2),
    ("dpm_2", {}, 2),
    ("dpm_2_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_sde", {"eta": 0.0}, 2),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2),
    ("dpmpp_3m_sde", {"eta": 0.0}, 3),
    ("unipc", {}, 3),  # UniPC-2 with its corrector is third order (Zhao et al. 2023, Thm 3.3)
    ("unipc", {"corrector": False}, 2),
    ("unipc", {"variant": "bh1"}, 3),
    ("deis", {}, 3),  # = lms of order 3 (see test_deis_is_lms_of_order_3)
    ("ipndm", {}, 2),  # fixed equal-step weights on karras steps: second order, not fourth
    ("res_multistep", {}, 2),
    ("heunpp2", {}, 1),  # its sigma-proportional weights are no quadrature rule
    ("uni_pc", {}, 3),  # ComfyUI's uni_pc: bh1
    ("seeds_2", {"eta": 0.0}, 2),  # = DPM-Solver++(2S)
    ("seeds_3", {"eta": 0.0}, 3),  # = DPM-Solver++(3S)
    ("gradient_estimation", {}, 1),  # the extrapolated direction overshoots AB2's: first order
    ("exp_heun_2_x0", {}, 2),
    ("exp_heun_2_x0", {"solver_type": "phi_1"}, 2),
    ("seeds_2", {"eta": 0.0, "solver_type": "phi_2"}, 2),
    ("sa_solver", {"eta": 0.0}, 4),  # Adams-Bashforth 3 predicting, Adams-Moulton 4 correcting: measured 3.99
    ("sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 0}, 2),
    ("sa_solver_pece", {"eta": 0.0}, 4),
]


@pytest.mark.parametrize("name, options, order", DETERMINISTIC, ids=lambda v: str(v))
def test_deterministic_samplers_converge_with_their_order(name, options, order):
    assert convergence_order(limner.create("samplers", name, **options)) == pytest.approx(order, abs=0.25)


def test_dpmpp_3m_needs_the_full_quadratic_term(monkeypatch):
    import limner.plugins.samplers as samplers

    fn = limner.create("samplers", "dpmpp_3m_sde", eta=0.0)
    monkeypatch.setattr(samplers, "QUADRATIC_TERM", 1.0)  # k-diffusion's -phi_3 * d2
    assert convergence_order(fn) == pytest.approx(2, abs=0.25)


def test_lms_is_high_order():
    # Fourth-order Adams-Bashforth after a warm-up of lower orders; the Euler first step at
    # sigma_max keeps the measured slope near 3.5 over 16..128 steps.
    assert convergence_order(limner.create("samplers", "lms")) > 3.0


@pytest.mark.parametrize("name, options, order", DETERMINISTIC, ids=lambda v: str(v))
def test_the_final_step_to_zero_noise_is_handled(name, options, order):
    sigmas = limner.create("schedules", "karras")(100, 0.002, 80.0)  # ends in an exact 0
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    out = limner.create("samplers", name, **options)(gaussian_denoiser, x, sigmas)
    assert (out - exact_flow(x, 80.0, 0.0)).abs().max() < 0.05


STOCHASTIC = [  # (name, options, weak order): first-order methods keep a bias of a few %
    ("euler", {"s_churn": 20.0}, 1),
    ("heun", {"s_churn": 20.0}, 2),
    ("dpm_2", {"s_churn": 20.0}, 2),
    ("euler_ancestral", {}, 1),
    ("dpm_2_ancestral", {}, 2),
    ("dpmpp_2s_ancestral", {}, 2),
    ("dpmpp_sde", {}, 2),
    ("dpmpp_2m_sde", {}, 2),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 2),
    ("dpmpp_3m_sde", {}, 2),
    ("ddim", {"eta": 1.0}, 1),
    ("ddpm", {}, 1),
    ("dpmpp_2m", {}, 2),
    ("lms", {}, 2),
    ("unipc", {}, 2),
    ("res_multistep_ancestral", {}, 1),
    ("dpm_fast", {"eta": 1.0}, 2),
    ("dpmpp_2m_sde_heun", {}, 2),
    ("seeds_2", {}, 2),
    ("seeds_3", {}, 2),
    ("er_sde", {}, 2),  # stage 3; stage 1 alone keeps a 1.4% bias in the std
    ("exp_heun_2_x0_sde", {}, 2),
    ("sa_solver", {}, 2),  # noise only inside its sigma window: std 0.5% high, as with the window everywhere 0.1%
    ("sa_solver", {"s_tmin": 0.0, "s_tmax": 1e9}, 2),
    ("sa_solver_pece", {}, 2),
]
N = 40_000


def moments(name, options, model=gaussian_denoiser, steps=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sigmas = limner.create("schedules", "karras")(steps, 0.002, 80.0)
    x = torch.randn(N, 2, generator=gen, dtype=torch.float64) * 80.0
    out = limner.create("samplers", name, **options)(model, x, sigmas, generator=gen)
    return out.mean(0), out.std(0)


@pytest.mark.parametrize("name, options, order", STOCHASTIC, ids=lambda v: str(v))
def test_samplers_reproduce_the_data_distribution(name, options, order):
    mean, std = moments(name, options)
    # sampling error of the mean: s / sqrt(N) <= 0.006; of the std: s / sqrt(2N) <= 0.35%.
    # Measured at 200 steps: first-order methods' std is 3-4% low, the rest within 0.4%.
    assert torch.allclose(mean, MU, atol=0.025), mean
    assert torch.allclose(std, S, rtol=0.05 if order == 1 else 0.015), std


def test_lcm_with_the_exact_consistency_function_samples_the_data():
    mean, std = moments("lcm", {}, model=consistency_function, steps=4)
    assert torch.allclose(mean, MU, atol=0.03) and torch.allclose(std, S, rtol=0.03)


def test_lcm_with_a_plain_denoiser_shrinks_the_variance():
    # LCM needs a consistency model: with the posterior mean, variance collapses (s^4/(s^2+sigma^2)).
    _, std = moments("lcm", {}, steps=4)
    assert (std < 0.9 * S).all()


STOCHASTIC_NAMES = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                    "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "res_multistep_ancestral", "dpmpp_2m_sde_heun",
                    "er_sde", "seeds_2", "seeds_3"]


@pytest.mark.parametrize("name", STOCHASTIC_NAMES)
def test_same_seed_same_result_other_seed_other_result(name):
    sigmas = limner.create("schedules", "karras")(10, 0.002, 80.0)
    fn = limner.create("samplers", name)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80

    def run(seed):
        return fn(gaussian_denoiser, x.clone(), sigmas, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


OWN_STEPS = ("dpm_fast", "dpm_adaptive")  # take only the schedule's end points


@pytest.mark.parametrize("name", limner.list_components("samplers")["samplers"])
def test_callback_sees_every_step_and_docstring_names_a_paper(name):
    sigmas = limner.create("schedules", "exponential")(7, 0.01, 10.0)
    seen = []
    fn = limner.create("samplers", name)
    fn(gaussian_denoiser, torch.zeros(3, 2, dtype=torch.float64) + 10, sigmas,
       callback=lambda info: seen.append((info["i"], info["sigma"], info["denoised"].shape)))
    steps = [torch.as_tensor(s).max().item() for _, s, _ in seen]
    if name in OWN_STEPS:  # their own steps, from the first sigma down towards the last positive one
        assert steps[0] == pytest.approx(10.0) and steps == sorted(steps, reverse=True) and steps[-1] > 0.01
    else:
        assert [i for i, _, _ in seen] == list(range(7))
        assert steps == pytest.approx(sigmas[:-1].tolist())
    doc = limner.get_component("samplers", name).load().__doc__
    assert re.search(r"(18|19|20)\d\d", doc), f"{name}'s docstring cites no paper"


def test_unknown_sampler_and_bad_option_are_clear():
    with pytest.raises(limner.UnknownComponentError, match=r"Did you mean: dpmpp_2m_sde.*Valid samplers: ddim"):
        limner.create("samplers", "dpmpp_2m_sd")
    with pytest.raises(limner.LimnerError, match=r"unknown option 'order'.*Valid options: eta, s_noise, solver_type"):
        limner.create("samplers", "dpmpp_2m_sde", order=3)
    with pytest.raises(limner.LimnerError, match="solver_type must be 'midpoint' or 'heun', got 'rk4'"):
        limner.create("samplers", "dpmpp_2m_sde", solver_type="rk4")(gaussian_denoiser, torch.ones(1, 2), [1.0, 0.0])


class Counting:
    """A denoiser that counts its calls: by default the conditional linear D = x * 0.5 + cond."""

    def __init__(self, inner=None):
        self.calls, self.inner = 0, inner

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return x * 0.5 + cond if self.inner is None else self.inner(x, sigma)


def test_guidance_combines_both_branches_in_one_call():
    model = Counting()
    x, sigma = torch.randn(3, 2), torch.ones(3)
    cond, uncond = torch.full((3, 2), 2.0), torch.full((3, 2), -1.0)
    out = Guided(model, 4.0)(x, sigma, cond=cond, uncond=uncond)
    assert model.calls == 1
    expected = (x * 0.5 - 1.0) + 4.0 * ((x * 0.5 + 2.0) - (x * 0.5 - 1.0))
    assert torch.allclose(out, expected)
    assert torch.allclose(Guided(model, 1.0)(x, sigma, cond=cond, uncond=uncond), x * 0.5 + cond)
    assert model.calls == 2


def test_sample_applies_guidance_once_for_any_sampler():
    model = Counting()
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.ones(2, 2), torch.zeros(2, 2)
    steps = []
    out = sample(model, noise, sampler="dpmpp_2m", schedule="karras", steps=6, guidance=3.0, cond=cond,
                 uncond=uncond, progress=True, callback=lambda info: steps.append(info["i"]))
    assert model.calls == 6 and steps == list(range(6))
    # the same sampler on the guided model written out by hand: D = 0.5 x + (0 + 3 * (1 - 0))
    by_hand = limner.create("samplers", "dpmpp_2m")(
        lambda x, sigma, **_: 0.5 * x + 3.0, noise * 80.0, limner.create("schedules", "karras")(6, 0.002, 80.0))
    assert torch.allclose(out, by_hand)


def test_sample_rejects_bad_steps_and_sigma_range():
    with pytest.raises(limner.LimnerError, match="steps must be >= 1, got 0"):
        sample(gaussian_denoiser, torch.zeros(1, 2), sampler="euler", schedule="karras", steps=0)
    with pytest.raises(limner.LimnerError, match="need 0 < sigma_min < sigma_max"):
        sample(gaussian_denoiser, torch.zeros(1, 2), sampler="euler", schedule="karras", sigma_min=5.0, sigma_max=1.0)


def test_deis_is_lms_of_order_3():
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    sigmas = limner.create("schedules", "karras")(10, 0.002, 80.0)
    deis = limner.create("samplers", "deis")(gaussian_denoiser, x.clone(), sigmas)
    lms3 = limner.create("samplers", "lms", order=3)(gaussian_denoiser, x.clone(), sigmas)
    assert torch.equal(deis, lms3)
    assert limner.get_component("samplers", "ipndm_v").name == "lms"


def test_dpm_fast_is_third_order_in_its_model_calls():
    # nfe = 3k + 2: k third-order steps and one second-order step, equally spaced in log sigma
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20
    nfes, errors = (8, 14, 26, 50), []
    for n in nfes:
        model = Counting(gaussian_denoiser)
        out = limner.create("samplers", "dpm_fast")(
            model, x.clone(), limner.create("schedules", "karras")(n, 0.05, 20.0)
        )
        assert model.calls == n
        errors.append((out - exact_flow(x, 20.0, 0.05)).abs().max().item())
    assert -np.polyfit(np.log(nfes), np.log(errors), 1)[0] > 3.0, errors


def test_dpm_adaptive_spends_calls_on_tolerance_and_keeps_each_image_to_itself():
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20
    sigmas = limner.create("schedules", "karras")(10, 0.05, 20.0)
    runs = []
    for rtol in (0.05, 0.002):
        model = Counting(gaussian_denoiser)
        out = limner.create("samplers", "dpm_adaptive", rtol=rtol, atol=rtol / 6)(model, x.clone(), sigmas)
        runs.append((model.calls, (out - exact_flow(x, 20.0, 0.05)).abs().mean().item()))
    (loose_calls, loose_error), (tight_calls, tight_error) = runs
    assert tight_calls > loose_calls and tight_error < 0.7 * loose_error, (
        runs
    )  # measured 29 vs 44 calls, 0.026 vs 0.014
    fn = limner.create("samplers", "dpm_adaptive")
    batch = fn(gaussian_denoiser, x.clone(), sigmas)
    alone = torch.cat([fn(gaussian_denoiser, x[i : i + 1].clone(), sigmas) for i in range(3)])
    assert torch.equal(batch[:3], alone)  # per-image step sizes: the batch does not matter
    with pytest.raises(limner.LimnerError, match="order must be 2 or 3, got 4"):
        limner.create("samplers", "dpm_adaptive", order=4)(gaussian_denoiser, x, sigmas)


@pytest.mark.parametrize("name, options, tolerance", [
    ("dpm_fast", {}, 1e-5), ("dpm_adaptive", {"order": 2}, 1e-5), ("dpm_adaptive", {}, 1e-3)])
def test_equal_to_k_diffusion(name, options, tolerance, monkeypatch):
    """Against k-diffusion's functions where installed (`make bench-setup`). NOTE: k-diffusion
    keeps log-sigma times in float32: measured 1.8e-6 (dpm_fast), 1.0e-6 (dpm_adaptive order 2)
    and 1.2e-4 (order 3, whose step-size decisions amplify it) on this problem."""
    import sys

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    anchors = pytest.importorskip("anchors")
    before = set(sys.modules)
    try:
        k = anchors.k_diffusion_sampling()
    except ImportError:
        pytest.skip("k-diffusion is not installed")
    finally:  # the stand-in torchvision must not leak into other tests' imports
        for module in set(sys.modules) - before:
            if module.split(".")[0] in ("torchvision", "k_diffusion"):
                del sys.modules[module]
    x = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20
    sigmas = limner.create("schedules", "karras")(10, 0.05, 20.0)
    ours = limner.create("samplers", name, **options)(gaussian_denoiser, x.clone(), sigmas)
    if name == "dpm_fast":
        theirs = k.sample_dpm_fast(gaussian_denoiser, x.clone(), 0.05, 20.0, 10, disable=True)
    else:
        theirs = k.sample_dpm_adaptive(gaussian_denoiser, x.clone(), 0.05, 20.0, disable=True, **options)
    assert (ours - theirs).abs().max() < tolerance


def test_cfg_pp_lands_on_the_guided_estimate_and_renoises_along_the_unconditional_one():
    """euler_cfg_pp: x' = D_g + s' (x - D_u) / s (Chung et al. 2024), for a conditional linear D."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    cond, uncond = torch.full((3, 2), 2.0, dtype=torch.float64), torch.full((3, 2), -1.0, dtype=torch.float64)
    sigmas, lam = torch.tensor([10.0, 4.0], dtype=torch.float64), 0.6
    model = Counting()
    out = limner.create("samplers", "euler_cfg_pp")(Guided(model, lam, "cfg_pp"), x.clone(), sigmas,
                                                   extra_args={"cond": cond, "uncond": uncond})
    d_c, d_u = 0.5 * x + cond, 0.5 * x + uncond
    d_g = d_u + lam * (d_c - d_u)
    assert torch.allclose(out, d_g + 4.0 * (x - d_u) / 10.0)
    assert model.calls == 1
    # through sample(): the name alone switches the mode, and guidance 1 still runs both branches
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = sample(Counting(), noise, sampler="dpmpp_2m", schedule="karras", steps=4, guidance=1.0, cond=cond,
                   uncond=uncond)
    pp = sample(Counting(), noise, sampler="dpmpp_2m_cfg_pp", schedule="karras", steps=4, guidance=1.0, cond=cond,
                uncond=uncond)
    assert not torch.allclose(plain, pp)


def test_cfg_pp_refuses_samplers_outside_the_fused_update():
    model = Guided(Counting(), 0.5, "cfg_pp")
    with pytest.raises(limner.LimnerError, match="CFG\\+\\+ changes how a sampler's update reads x.*<name>_cfg_pp"):
        limner.create("samplers", "heun")(model, torch.ones(1, 2), [1.0, 0.0],
                                          extra_args={"cond": torch.ones(1, 2), "uncond": torch.zeros(1, 2)})
    with pytest.raises(limner.LimnerError, match="CFG\\+\\+ needs the unconditional branch"):
        limner.create("samplers", "euler_cfg_pp")(
            model, torch.ones(1, 2), [1.0, 0.0], extra_args={"cond": torch.ones(1, 2)}
        )
    with pytest.raises(limner.LimnerError, match="unknown guidance mode 'pp'. Valid: cfg, cfg_pp"):
        Guided(Counting(), 1.0, "pp")


def test_sa_solver_of_order_one_is_ddim_and_its_weights_integrate_the_exponential():
    """Without history and corrector, SA-Solver's step is DDIM's (tau = 0); its weights are the
    exact integral (1 + tau^2) * int exp(-(1 + tau^2)(l_t - l)) l_j(l) dl of Xue et al. 2023."""
    from limner.plugins.samplers import sa_coefficients

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    sigmas = limner.create("schedules", "karras")(12, 0.05, 20.0)
    first = limner.create("samplers", "sa_solver", eta=0.0, predictor_order=1, corrector_order=0)
    assert torch.allclose(first(gaussian_denoiser, x.clone(), sigmas), limner.create("samplers", "ddim")(
        gaussian_denoiser, x.clone(), sigmas), atol=1e-12)
    h, tau = 0.7, 0.8
    (b,) = sa_coefficients([0.3], 0.3, 0.3 + h, tau)
    assert b == pytest.approx(-np.expm1(-(1 + tau**2) * h), rel=1e-14)
    # order 2: the weights of the two nodes integrate constants and lambda itself exactly
    b1, b2 = sa_coefficients([0.3, -0.2], 0.3, 1.0, tau)
    c = 1 + tau**2
    ts = np.linspace(0.3, 1.0, 200_001)
    kernel = c * np.exp(-c * (1.0 - ts))
    assert b1 + b2 == pytest.approx(np.trapezoid(kernel, ts), rel=1e-9)
    assert 0.3 * b1 - 0.2 * b2 == pytest.approx(np.trapezoid(kernel * ts, ts), rel=1e-9)
    with pytest.raises(limner.LimnerError, match="predictor_order must be 1..6 and corrector_order 0..6.*got 0 and 4"):
        limner.create("samplers", "sa_solver", predictor_order=0)(gaussian_denoiser, x, sigmas)


def test_sa_solver_pece_calls_the_model_twice_a_step():
    model = Counting(gaussian_denoiser)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    sigmas = limner.create("schedules", "karras")(6, 0.05, 20.0)  # 6 steps, the last to 0
    limner.create("samplers", "sa_solver_pece")(model, x, sigmas)
    pece_calls, model.calls = model.calls, 0
    limner.create("samplers", "sa_solver")(model, x, sigmas)
    assert (pece_calls, model.calls) == (6 + 5, 6)  # a correction (and its call) after every step but the first


def test_dpmpp_2s_ancestral_cfg_pp_updates_both_stages_from_the_shifted_start():
    """ComfyUI's dpmpp_2s_ancestral_cfg_pp: x_2 = (s_mid/s)(x + D_g - D_u) - expm1(-h/2) D_g and
    x' = (s'/s)(x + D_g - D_u) - expm1(-h) D_g(x_2): both stages start from the CFG++-shifted x
    of the first evaluation (the second stage's own shift is not used)."""
    import math

    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    cond, uncond = torch.full((3, 2), 2.0, dtype=torch.float64), torch.full((3, 2), -1.0, dtype=torch.float64)
    sigmas, lam = torch.tensor([10.0, 4.0], dtype=torch.float64), 0.6
    out = limner.create("samplers", "dpmpp_2s_ancestral_cfg_pp", eta=0.0)(
        Guided(Counting(), lam, "cfg_pp"), x.clone(), sigmas, extra_args={"cond": cond, "uncond": uncond})

    def guided(x_):
        d_u = 0.5 * x_ + uncond
        return d_u, d_u + lam * (0.5 * x_ + cond - d_u)

    h = math.log(10.0 / 4.0)
    d_u, d_g = guided(x)
    shifted = x + d_g - d_u
    x_2 = math.exp(-h / 2) * shifted - math.expm1(-h / 2) * d_g
    expected = 0.4 * shifted - math.expm1(-h) * guided(x_2)[1]
    assert torch.allclose(out, expected, atol=1e-12)


def test_each_sampler_is_one_function_and_one_catalogue_line():
    """A sampler is written once (issue 24): `sample_<name>` in plugins/samplers.py and one line
    of limner.plugins.SAMPLERS (aliases, CFG++ variant); the registry holds exactly those."""
    import limner.plugins as catalogue
    import limner.plugins.samplers as module

    functions = {n.removeprefix("sample_") for n, f in vars(module).items()
                 if n.startswith("sample_") and callable(f) and f.__module__ == module.__name__}
    names = [n for n, _, _ in catalogue.SAMPLERS]
    assert len(names) == len(set(names)) and set(names) == functions
    expected = set(names) | {f"{n}_cfg_pp" for n, _, cfg_pp in catalogue.SAMPLERS if cfg_pp}
    assert set(limner.list_components("samplers")["samplers"]) == expected


def test_sample_is_the_one_path_with_explicit_sigmas_image_to_image_and_inpainting():
    """limner.sampling.sample takes what pipelines need (issue 24): explicit sigmas, an init
    image redrawn from part-way (strength), and a mask whose known pixels survive exactly."""
    from limner.sampling import sample

    gen = torch.Generator().manual_seed(0)
    noise, init = torch.randn(2, 1, 4, 4, generator=gen), torch.rand(2, 1, 4, 4, generator=gen)
    zero = lambda x, sigma, cond=None: torch.zeros_like(x)  # noqa: E731 - a denoiser that says 0
    assert sample(zero, noise, sampler="euler", sigmas=[2.0, 1.0, 0.0]).abs().max() == 0
    seen = []
    def spy(x, sigma, cond=None):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)
    sample(spy, noise, sampler="euler", schedule="karras", steps=10, init=init, strength=0.3)
    assert len(seen) == 3  # the last 30% of 10 steps
    redraw = torch.zeros(2, 1, 4, 4)
    redraw[..., :2] = 1
    out = sample(zero, noise, sampler="dpmpp_2m", schedule="karras", steps=4, init=init, mask=redraw)
    assert torch.equal(out[..., 2:], init[..., 2:]) and out[..., :2].abs().max() == 0
    with pytest.raises(limner.LimnerError, match=r"a mask \(--mask\) needs an init image"):
        sample(zero, noise, sampler="euler", schedule="karras", mask=redraw)
    with pytest.raises(limner.LimnerError, match=r"euler_cfg_pp \(CFG\+\+\) does not combine with --mask"):
        sample(zero, noise, sampler="euler_cfg_pp", schedule="karras", init=init, mask=redraw, uncond=1, cond=1)
    with pytest.raises(limner.LimnerError, match="needs a schedule"):
        sample(zero, noise, sampler="euler")
