"""Built-in samplers, named as in k-diffusion and ComfyUI.

Every sampler has the signature sample(model, x, sigmas, *, extra_args=None, callback=None,
generator=None, **options) -> x, where model(x, sigma[B], **extra_args) returns the x0
estimate and x starts at noise * sigmas[0]. Guidance is applied by the framework around
`model`; samplers never see it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

import limner
from limner.plugins import SAMPLERS as CATALOGUE
from limner.sampling import (
    BrownianNoise,
    ancestral_step,
    as_floats,
    bind,
    bind_update,
    cfg_pp_spec,
    churn,
    randn_like,
    report,
    sampler_spec,
    to_d,
)

INF = float("inf")


def sample_euler(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=INF, s_noise=1.0):
    """Euler's method on the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2)."""
    sig, step = as_floats(sigmas), bind_update(model, x, extra_args)
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        ratio = sig[i + 1] / sigma_hat  # x + (x - D) / s * (s' - s) = (s'/s) x + (1 - s'/s) D
        x_next, denoised = step(x, sigma_hat, ratio, 1 - ratio)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        x = x_next
    return x


def sample_euler_ancestral(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (Song et al. 2021; k-diffusion's euler_ancestral):
    an Euler step to sigma_down, then fresh noise of sigma_up - in sigma form the same update
    as DDIM with that eta, so it is ddim at eta=1."""
    return sample_ddim(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                       eta=eta, s_noise=s_noise)


def sample_heun(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=INF, s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Alg. 2); Euler on the last step to 0."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = f(x, sigma_hat)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        d, dt = to_d(x, sigma_hat, denoised), sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sig[i + 1], f(x_2, sig[i + 1]))
        x = x + (d + d_2) / 2 * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


def sample_dpm_2(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=INF, s_noise=1.0):
    """DPM-Solver-2 (Lu et al. 2022) in the Karras sigma form: a midpoint step in log-sigma."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = f(x, sigma_hat)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sig[i + 1])
        x_2 = x + d * (sigma_mid - sigma_hat)
        x = x + to_d(x_2, sigma_mid, f(x_2, sigma_mid)) * (sig[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps (Lu et al. 2022; k-diffusion's dpm_2_ancestral)."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        d = to_d(x, sig[i], denoised)
        if down == 0:
            x = x + d * (down - sig[i])
        else:
            sigma_mid = _log_midpoint(sig[i], down)
            x_2 = x + d * (sigma_mid - sig[i])
            x = x + to_d(x_2, sigma_mid, f(x_2, sigma_mid)) * (down - sig[i])
        if up > 0:
            x = x + randn_like(x, generator) * s_noise * up
    return x


@functools.lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(nodes.tolist()), tuple(weights.tolist())


def lms_coefficient(sig: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial of node sig[i-j].

    The basis has degree order-1, so Gauss-Legendre with ceil(order/2) nodes is exact.
    """
    nodes = [sig[i - k] for k in range(order)]
    a, b = sig[i], sig[i + 1]
    total = 0.0
    for u, w in zip(*_gauss_legendre(max(1, (order + 1) // 2))):
        tau = (a + b) / 2 + (b - a) / 2 * u
        total += w * math.prod((tau - s) / (nodes[j] - s) for k, s in enumerate(nodes) if k != j)
    return total * (b - a) / 2


def sample_lms(model, x, sigmas, *, extra_args=None, callback=None, generator=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) of the given order, as in k-diffusion's
    lms (Karras et al. 2022 cite it as a baseline); lower orders while history builds up."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        ds = [to_d(x, sig[i], denoised), *ds][:order]
        cur = len(ds)
        x = x + sum(lms_coefficient(sig, i, j, cur) * d for j, d in enumerate(ds))
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                              eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, "DPM-Solver++")."""
    sig, step = as_floats(sigmas), bind_update(model, x, extra_args)
    for i in range(len(sig) - 1):
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        noise = randn_like(x, generator) if up > 0 else None
        if down == 0:  # the last step lands on D
            x_next, denoised = step(x, sig[i], 0.0, 1.0)
        else:  # a step to the midpoint in lambda = -log(sigma), then the whole step from x with D there
            h = math.log(sig[i]) - math.log(down)
            sigma_mid = sig[i] * math.exp(-h / 2)
            x_2, denoised = step(x, sig[i], sigma_mid / sig[i], -math.expm1(-h / 2))
            x_next, _ = step(x_2, sigma_mid, down / sig[i], -math.expm1(-h), noise=noise, c=up * s_noise, x_from=x)
        report(callback, i, x, sig[i], sig[i], denoised)
        x = x_next
    return x


def sample_dpmpp_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ SDE, a stochastic two-stage solver (Lu et al. 2022; k-diffusion's dpmpp_sde)."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    noise = BrownianNoise(x, generator)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = x + to_d(x, sig[i], denoised) * (0 - sig[i])
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        sigma_s = sig[i] * math.exp(-r * h)
        # stage 1: to sigma_s, with the ancestral split of that sub-step
        down, up = ancestral_step(sig[i], sigma_s, eta)
        x_2 = denoised + (down / sig[i]) * (x - denoised)
        x_2 = x_2 + noise(sig[i], sigma_s) * s_noise * up
        denoised_2 = f(x_2, sigma_s)
        # stage 2: the full step with the two estimates blended (weight 1/(2r) on stage 1's)
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        w = 1 / (2 * r)
        blended = (1 - w) * denoised + w * denoised_2
        x = blended + (down / sig[i]) * (x - blended)
        x = x + noise(sig[i], sig[i + 1]) * s_noise * up
    return x


def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """DPM-Solver++(2M), the second-order multistep solver of Lu et al. 2022 (Alg. 2)."""
    sig, step = as_floats(sigmas), bind_update(model, x, extra_args)
    old_denoised, h_last = None, 0.0
    for i in range(len(sig) - 1):
        if sig[i + 1] == 0:  # the last step lands on D
            x_next, denoised = step(x, sig[i], 0.0, 1.0)
        else:  # x' = (s'/s) x - expm1(-h) * ((1 + k) D - k D_old), k = h / (2 h_last)
            h = math.log(sig[i]) - math.log(sig[i + 1])
            k = h / (2 * h_last) if old_denoised is not None else 0.0
            x_next, denoised = step(x, sig[i], sig[i + 1] / sig[i], -math.expm1(-h) * (1 + k),
                                    old_denoised, math.expm1(-h) * k)
            h_last = h
        report(callback, i, x, sig[i], sig[i], denoised)
        x, old_denoised = x_next, denoised
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's dpmpp_2m_sde), midpoint or heun."""
    if solver_type not in ("midpoint", "heun"):
        raise limner.LimnerError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    noise = BrownianNoise(x, generator)
    old_denoised, h_last = None, 0.0
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        h_eta = h * (1 + eta)
        phi_1 = -math.expm1(-h_eta)
        x = (sig[i + 1] / sig[i]) * math.exp(-eta * h) * x + phi_1 * denoised
        if old_denoised is not None:
            slope = (denoised - old_denoised) * (h / h_last)
            coef = 0.5 * phi_1 if solver_type == "midpoint" else 1 - phi_1 / h_eta
            x = x + coef * slope
        if eta > 0:
            x = x + noise(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


# d2 below estimates h^2 x0''/2, and the exact integral of that term is -2 phi_3 d2.
# NOTE: k-diffusion and DPM-Solver's reference code write -phi_3 * d2, which halves the
# quadratic term and leaves the method second order; measured on the Gaussian ODE
# (tests/test_samplers.py): global order 1.9 with -phi_3, 3.0 with -2 phi_3.
QUADRATIC_TERM = 2.0


def sample_dpmpp_3m_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE, the third-order multistep variant (Lu et al. 2022; k-diffusion).

    eta=0 gives the deterministic DPM-Solver++(3M). See the NOTE below on its quadratic term.
    """
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    noise = BrownianNoise(x, generator)
    history: list[tuple[torch.Tensor, float]] = []  # (denoised, h) of the last two steps
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        h_eta = h * (1 + eta)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        if len(history) == 2:
            (d_1, h_1), (d_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - QUADRATIC_TERM * phi_3 * d2
        elif history:
            d_1, h_1 = history[0]
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        if eta > 0:
            x = x + noise(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        history = [(denoised, h), *history][:2]
    return x


def sample_ddim(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=0.0, s_noise=1.0):
    """DDIM (Song, Meng & Ermon 2021) in sigma form: x' = x0 + sigma_down * eps + sigma_up * z.

    Dividing DDIM's update by sqrt(abar) shows its sigma_t(eta) is the ancestral split with
    the same eta; eta=0 is deterministic (Euler on the ODE), eta=1 is DDPM's posterior.
    """
    sig, step = as_floats(sigmas), bind_update(model, x, extra_args)
    for i in range(len(sig) - 1):
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        noise = randn_like(x, generator) if up > 0 else None
        # D + down * (x - D) / s + up * s_noise * z
        x_next, denoised = step(x, sig[i], down / sig[i], 1 - down / sig[i], noise=noise, c=up * s_noise)
        report(callback, i, x, sig[i], sig[i], denoised)
        x = x_next
    return x


def sample_ddpm(model, x, sigmas, *, extra_args=None, callback=None, generator=None, s_noise=1.0):
    """Ancestral sampling from DDPM's posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020).

    In sigma form the posterior is N(x0 + (s'/s)^2 (x - x0), s'^2 (1 - (s'/s)^2)).
    """
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        ratio = (sig[i + 1] / sig[i]) ** 2
        x = denoised + ratio * (x - denoised)
        if sig[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sig[i + 1] * math.sqrt(1 - ratio)
    return x


def _unipc_rhos(rks: list[float], hh: float, b_h: float) -> torch.Tensor:
    """Solve UniPC's order conditions R rho = b (Zhao et al. 2023, Alg. 1 / Thm 3.1)."""
    order = len(rks)
    phi_k, fact, rows, b = math.expm1(hh) / hh - 1, 1, [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(phi_k * fact / b_h)
        fact *= k + 1
        phi_k = phi_k / hh - 1 / fact
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def sample_unipc(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 order=2, variant="bh2", corrector=True):
    """UniPC (Zhao et al. 2023), the unified predictor-corrector, in data-prediction form.

    The predictor UniP-p extrapolates earlier x0 estimates; the corrector UniC reuses the
    model call at the predicted point, so each step costs one evaluation.
    """
    if variant not in ("bh1", "bh2"):
        raise limner.LimnerError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    n = len(sig) - 1
    denoised = f(x, sig[0])
    history: list[tuple[torch.Tensor, float]] = []  # earlier (x0 estimate, lambda), newest first
    for i in range(n):
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            break
        lam, lam_next = -math.log(sig[i]), -math.log(sig[i + 1])
        h = lam_next - lam
        p = min(order, len(history) + 1, n - i)
        rks = [(lam_k - lam) / h for _, lam_k in history[: p - 1]]
        d1s = [(d_k - denoised) / r for (d_k, _), r in zip(history, rks)]
        hh = -h
        b_h = hh if variant == "bh1" else math.expm1(hh)
        x_lin = (sig[i + 1] / sig[i]) * x - math.expm1(hh) * denoised
        if d1s:
            rhos_p = [0.5] if p == 2 else _unipc_rhos(rks, hh, b_h).tolist()
            x_next = x_lin - b_h * sum(rho * d for rho, d in zip(rhos_p, d1s))
        else:
            x_next = x_lin
        denoised_next = f(x_next, sig[i + 1]) if i < n - 1 else None  # the last step needs none
        if corrector and denoised_next is not None:
            rhos_c = [0.5] if p == 1 else _unipc_rhos([*rks, 1.0], hh, b_h).tolist()
            corr = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s)) + rhos_c[-1] * (denoised_next - denoised)
            x_next = x_lin - b_h * corr
        history = [(denoised, lam), *history][: max(order - 1, 0)]
        x, denoised = x_next, denoised_next
    return x


def sample_lcm(model, x, sigmas, *, extra_args=None, callback=None, generator=None, s_noise=1.0):
    """Multistep consistency sampling (Song et al. 2023; Luo et al. 2023, LCM): jump to x0,
    then re-noise to the next sigma."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sig[i + 1]
    return x


def sample_deis(model, x, sigmas, *, extra_args=None, callback=None, generator=None, max_order=3):
    """DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"),
    its polynomial-extrapolation multistep rule. On the EDM ODE dx/dsigma = eps the exponential
    integrator's linear part is the identity, so tAB and rhoAB both integrate the Lagrange
    polynomial through the last `max_order` eps values over sigma: Adams-Bashforth in sigma,
    i.e. `lms` of that order (ComfyUI's deis defaults to order 3)."""
    if not 1 <= max_order <= 4:
        raise limner.LimnerError(f"deis: max_order must be 1..4, got {max_order}")
    return sample_lms(model, x, sigmas, extra_args=extra_args, callback=callback, order=max_order)


# Adams-Bashforth weights for equal steps, orders 1-4 (newest derivative first)
IPNDM_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_ipndm(model, x, sigmas, *, extra_args=None, callback=None, generator=None, max_order=4):
    """Improved PNDM (Zhang & Chen 2023, DEIS, sec. 5; after Liu et al. 2022, PNDM): Adams-
    Bashforth on dx/dsigma with the fixed equal-step weights, lower orders while the history
    fills. On steps of varying length (karras) the fixed weights make it second order; `lms`
    (alias ipndm_v) is the variable-step version of the same rule."""
    if not 1 <= max_order <= 4:
        raise limner.LimnerError(f"ipndm: max_order must be 1..4, got {max_order}")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        ds = [to_d(x, sig[i], denoised), *ds][:max_order]
        x = x + (sig[i + 1] - sig[i]) * sum(w * d for w, d in zip(IPNDM_WEIGHTS[len(ds) - 1], ds))
    return x


def sample_res_multistep(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                         eta=0.0, s_noise=1.0):
    """The refined exponential solver, multistep (RES; Zhang, Tao & Chen 2023, "Improved order
    analysis and design of exponential integrator for diffusion models"): the data prediction,
    linearly interpolated in lambda = -log sigma through its last two values, integrated
    exactly (phi_2, where DPM-Solver++(2M) approximates it). eta > 0: ancestral steps."""
    sig, step = as_floats(sigmas), bind_update(model, x, extra_args)
    old_denoised = None
    for i in range(len(sig) - 1):
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        if down == 0:  # the last step lands on D
            x_next, denoised = step(x, sig[i], 0.0, 1.0)
        else:  # x' = (down/s) x + phi_1 D + k (D - D_old) + up z, k = h^2 phi_2 / (lambda_i - lambda_{i-1})
            h = math.log(sig[i]) - math.log(down)
            phi_1 = -math.expm1(-h)  # h * phi_1(h); h^2 * phi_2(h) = h - phi_1
            k = (h - phi_1) / (math.log(sig[i - 1]) - math.log(sig[i])) if old_denoised is not None else 0.0
            noise = randn_like(x, generator) if up > 0 else None
            x_next, denoised = step(x, sig[i], down / sig[i], phi_1 + k, old_denoised, -k, noise, up * s_noise)
        report(callback, i, x, sig[i], sig[i], denoised)
        x, old_denoised = x_next, denoised
    return x


def sample_res_multistep_ancestral(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                                   eta=1.0, s_noise=1.0):
    """RES multistep (Zhang, Tao & Chen 2023) with ancestral steps: res_multistep at eta=1."""
    return sample_res_multistep(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                                eta=eta, s_noise=s_noise)


def sample_heunpp2(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                   s_churn=0.0, s_tmin=0.0, s_tmax=INF, s_noise=1.0):
    """Heun++ ("heunpp2" of ComfyUI, from the sd-webui-samplers-scheduler extension, 2023):
    Heun's predictor chained one step further, the derivatives at sigma, sigma' and sigma''
    blended with weights proportional to sigma' / sigma_max and sigma'' / sigma_max. A
    heuristic: the weights are not a quadrature rule, so it is first order (measured)."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    end = sig[-1]
    for i in range(len(sig) - 1):
        x, sigma_hat = churn(x, sig[i], len(sig) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = f(x, sigma_hat)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        d, dt = to_d(x, sigma_hat, denoised), sig[i + 1] - sigma_hat
        if sig[i + 1] == end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sig[i + 1], f(x_2, sig[i + 1]))
        if sig[i + 2] == end:
            w_2 = sig[i + 1] / (2 * sig[0])
            x = x + ((1 - w_2) * d + w_2 * d_2) * dt
            continue
        x_3 = x_2 + d_2 * (sig[i + 2] - sig[i + 1])
        d_3 = to_d(x_3, sig[i + 2], f(x_3, sig[i + 2]))
        w_2, w_3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
        x = x + ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3) * dt
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, *, extra_args=None, callback=None, generator=None,
                             eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the heun solver type (Lu et al. 2022; ComfyUI's dpmpp_2m_sde_heun)."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                               eta=eta, s_noise=s_noise, solver_type="heun")


def sample_uni_pc(model, x, sigmas, *, extra_args=None, callback=None, generator=None, order=2):
    """UniPC with B(h) = h, variant bh1 (Zhao et al. 2023), as ComfyUI's `uni_pc` ('uni_pc_bh2'
    and diffusers' UniPCMultistepScheduler default to bh2: `unipc`)."""
    return sample_unipc(model, x, sigmas, extra_args=extra_args, callback=callback, order=order, variant="bh1")


def sample_gradient_estimation(model, x, sigmas, *, extra_args=None, callback=None, generator=None, ge_gamma=2.0):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models
    from an Optimization Perspective"): Euler steps along ge_gamma * d + (1 - ge_gamma) * d_prev,
    the denoising direction extrapolated from the last two."""
    sig, step = as_floats(sigmas), bind_update(model, x, extra_args)
    old_d = None
    for i in range(len(sig) - 1):
        dt = sig[i + 1] - sig[i]
        if old_d is None:  # x + dt (x - D) / s
            x_next, denoised = step(x, sig[i], 1 + dt / sig[i], -dt / sig[i])
        else:  # x + dt (g (x - D) / s + (1 - g) d_prev)
            g = ge_gamma
            x_next, denoised = step(x, sig[i], 1 + g * dt / sig[i], -g * dt / sig[i], old_d, (1 - g) * dt)
        report(callback, i, x, sig[i], sig[i], denoised)
        x, old_d = x_next, to_d(x, sig[i], denoised)
    return x


def _er_sde_scaler(sigma):
    """ComfyUI's default noise scale function of the ER SDE: phi(sigma) = sigma (exp(sigma^0.3) + 10)."""
    return sigma * (math.exp(sigma**0.3) + 10.0)


def sample_er_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None, s_noise=1.0, max_stage=3):
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time
    SDE for Diffusion Models"), VE form with ComfyUI's noise scale phi: x' = r x + (1 - r) D +
    (ds + phi' I_1) D' + (ds^2 / 2 + phi' I_2) D'' + sqrt(s'^2 - s^2 r^2) z, r = phi(s') / phi(s),
    I_k = int_{s'}^{s} (t - s)^(k-1) / phi(t) dt (Gauss-Legendre, exact for these smooth phi),
    D' and D'' divided differences of the last three denoised estimates."""
    if max_stage not in (1, 2, 3):
        raise limner.LimnerError(f"er_sde: max_stage must be 1, 2 or 3, got {max_stage}")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    nodes, weights = _gauss_legendre(8)
    history: list[torch.Tensor] = []  # denoised estimates, newest first
    old_slope = None
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        history = [denoised, *history][:3]
        if sig[i + 1] == 0:
            x = denoised
            continue
        s, s_next = sig[i], sig[i + 1]
        r = _er_sde_scaler(s_next) / _er_sde_scaler(s)
        x = r * x + (1 - r) * denoised
        stage, ds = min(max_stage, len(history)), s_next - s
        ts = [(s + s_next) / 2 + (s - s_next) / 2 * u for u in nodes]

        def integral(k):  # used within this step only: the loop's s, s_next and ts are this step's
            return (s - s_next) / 2 * sum(w * (t - s) ** k / _er_sde_scaler(t)  # noqa: B023
                                          for t, w in zip(ts, weights))  # noqa: B023

        slope = (history[0] - history[1]) / (s - sig[i - 1]) if stage >= 2 else None
        if stage >= 2:
            x = x + (ds + _er_sde_scaler(s_next) * integral(0)) * slope
        if stage >= 3 and old_slope is not None:
            curvature = (slope - old_slope) / ((s - sig[i - 2]) / 2)  # D'' (the 1/2 is in the coefficient)
            x = x + (ds**2 / 2 + _er_sde_scaler(s_next) * integral(1)) * curvature
        old_slope = slope
        if s_noise > 0:
            x = x + randn_like(x, generator) * s_noise * math.sqrt(max(s_next**2 - s**2 * r**2, 0.0))
    return x


def _exact_noise(zs: list[torch.Tensor], cuts: tuple[float, ...], k: int, h: float, eta: float) -> torch.Tensor:
    """The noise of the linear SDE's exact solution at cut k of a step of h in log sigma (over
    sigma there), composed from one standard draw per sub-interval [cuts[j], cuts[j+1]]: each
    carried forward with its decay, so every stage of a step sees one consistent path."""
    return sum(math.exp(-eta * (cuts[k] - cuts[j + 1]) * h)
               * math.sqrt(-math.expm1(-2 * eta * (cuts[j + 1] - cuts[j]) * h)) * zs[j] for j in range(k))


def _exponential_stage(sigma: float, frac: float, h: float, eta: float) -> tuple[float, float, float, float]:
    """(sigma after frac of the step, x's factor, expm1(-h_eta), h_eta) of a stochastic exponential
    step of frac * h in log sigma: x' = factor x - expm1(-h_eta) D + ... (data prediction)."""
    h_eta = (1 + eta) * frac * h
    return sigma * math.exp(-frac * h), math.exp(-(1 + eta) * frac * h), math.expm1(-h_eta), h_eta


def sample_seeds_2(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0, s_noise=1.0, r=0.5,
                   solver_type="phi_1"):
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality
    Sampling from Diffusion Models"), data prediction: a stochastic exponential step to the
    point r of the way in log sigma, then the full step with D extrapolated through both
    estimates (solver_type phi_1) or integrated with the phi_2 weight of its slope (phi_2); the
    noise of the two sub-intervals is reused so the whole step's noise is one consistent draw of
    the linear SDE's exact solution. r = 1 is an exponential Heun step (exp_heun_2_x0)."""
    if not 0 < r <= 1:
        raise limner.LimnerError(f"seeds_2: r must be in (0, 1], got {r}")
    if solver_type not in ("phi_1", "phi_2"):
        raise limner.LimnerError(f"seeds_2: unknown solver_type {solver_type!r}. Valid: phi_1, phi_2.")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h, cuts = math.log(sig[i]) - math.log(sig[i + 1]), (0.0, r, 1.0)
        zs = [randn_like(x, generator) for _ in range(2)] if eta > 0 else []
        sigma_mid, a_mid, phi_mid, _ = _exponential_stage(sig[i], r, h, eta)
        x_2 = a_mid * x - phi_mid * denoised
        if zs:
            x_2 = x_2 + sigma_mid * s_noise * _exact_noise(zs, cuts, 1, h, eta)
        denoised_2 = f(x_2, sigma_mid)
        _, a_t, phi_t, h_t = _exponential_stage(sig[i], 1.0, h, eta)
        if solver_type == "phi_1":
            x = a_t * x - phi_t * ((1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2)
        else:
            x = a_t * x - phi_t * denoised + (1 / r) * (phi_t / h_t + 1) * (denoised_2 - denoised)
        if zs:
            x = x + sig[i + 1] * s_noise * _exact_noise(zs, cuts, 2, h, eta)
    return x


def sample_exp_heun_2_x0(model, x, sigmas, *, extra_args=None, callback=None, generator=None, solver_type="phi_2"):
    """Exponential Heun in data prediction and log-SNR time (ComfyUI's exp_heun_2_x0): an
    exponential Euler step, D at its end, the step redone with D's slope weighted by phi_2
    (Hochbruck & Ostermann 2010, "Exponential integrators", sec. 2.2): SEEDS-2 at r = 1, eta = 0."""
    return sample_seeds_2(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                          eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type)


def sample_exp_heun_2_x0_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                             s_noise=1.0, solver_type="phi_2"):
    """Stochastic exponential Heun (ComfyUI's exp_heun_2_x0_sde): SEEDS-2 (Gonzalez et al. 2023)
    at r = 1, the exact noise of the linear SDE added once per step."""
    return sample_seeds_2(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                          eta=eta, s_noise=s_noise, r=1.0, solver_type=solver_type)


def sample_seeds_3(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0, s_noise=1.0,
                   r_1=1 / 3, r_2=2 / 3):
    """SEEDS-3 (Gonzalez et al. 2023), data prediction: DPM-Solver++(3S)'s three stages at r_1
    and r_2 of the step in log sigma (Lu et al. 2022), each a stochastic exponential step whose
    noise is composed from the same three sub-interval draws, so every stage sees one
    consistent path of the linear SDE's exact solution. eta=0 is DPM-Solver++(3S)."""
    if not 0 < r_1 < r_2 < 1:
        raise limner.LimnerError(f"seeds_3: need 0 < r_1 < r_2 < 1, got r_1={r_1}, r_2={r_2}")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h, cuts = math.log(sig[i]) - math.log(sig[i + 1]), (0.0, r_1, r_2, 1.0)
        zs = [randn_like(x, generator) for _ in range(3)] if eta > 0 else []
        sigma_1, a_1, phi_1, _ = _exponential_stage(sig[i], r_1, h, eta)
        x_1 = a_1 * x - phi_1 * denoised
        if zs:
            x_1 = x_1 + sigma_1 * s_noise * _exact_noise(zs, cuts, 1, h, eta)
        d_1 = f(x_1, sigma_1) - denoised
        sigma_2, a_2, phi_2, h_2 = _exponential_stage(sig[i], r_2, h, eta)
        x_2 = a_2 * x - phi_2 * denoised + (r_2 / r_1) * (phi_2 / h_2 + 1) * d_1
        if zs:
            x_2 = x_2 + sigma_2 * s_noise * _exact_noise(zs, cuts, 2, h, eta)
        d_2 = f(x_2, sigma_2) - denoised
        _, a_t, phi_t, h_t = _exponential_stage(sig[i], 1.0, h, eta)
        x = a_t * x - phi_t * denoised + (1 / r_2) * (phi_t / h_t + 1) * d_2
        if zs:
            x = x + sig[i + 1] * s_noise * _exact_noise(zs, cuts, 3, h, eta)
    return x


def sa_coefficients(lambdas: list[float], lam_s: float, lam_t: float, tau: float) -> list[float]:
    """SA-Solver's b_j (Xue et al. 2023, eqs. 15 and 18, alpha = 1): the integral over [lam_s,
    lam_t] of (1 + tau^2) exp(-(1 + tau^2)(lam_t - lam)) times the Lagrange basis polynomial of
    node lambdas[j]. The integrand is smooth and the interval short in lambda: 12-node
    Gauss-Legendre is exact to rounding for (1 + tau^2) h < 8 (NOTE: 3e-16 on order-1's
    1 - exp(-h) at h = 2)."""
    c, half = 1 + tau**2, (lam_t - lam_s) / 2
    total = [0.0] * len(lambdas)
    for u, w in zip(*_gauss_legendre(12)):
        lam = lam_s + half * (1 + u)
        weight = w * half * c * math.exp(-c * (lam_t - lam))
        for j, node in enumerate(lambdas):
            total[j] += weight * math.prod((lam - m) / (node - m) for k, m in enumerate(lambdas) if k != j)
    return total


def sample_sa_solver(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0, s_noise=1.0,
                     s_tmin=0.57, s_tmax=5.1, predictor_order=3, corrector_order=4, pece=False):
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of
    Diffusion Models"), data prediction: a stochastic Adams-Bashforth predictor through the last
    `predictor_order` estimates of D in lambda = -log sigma, then an Adams-Moulton corrector of
    the same step through `corrector_order` estimates, the new one included, with the same
    noise. tau = eta while s_tmin <= sigma <= s_tmax (ComfyUI's default window: SD's sigmas at
    timesteps 200 and 800), else the step is the ODE's. pece: D evaluated again after each
    correction (two model calls a step). Orders drop near the end, as in ComfyUI."""
    if not 1 <= predictor_order <= 6 or not 0 <= corrector_order <= 6:
        raise limner.LimnerError(f"sa_solver: predictor_order must be 1..6 and corrector_order 0..6 (0: no corrector), "
                                 f"got {predictor_order} and {corrector_order}")
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    n, lam = len(sig) - 1, [-math.log(s) if s > 0 else INF for s in sig]
    to_end = sig[-1] == 0  # lower the orders over the last steps (ComfyUI's lower_order_to_end)
    ds: list[torch.Tensor] = []
    x_pred, noise, tau, h = x, None, 0.0, 0.0
    for i in range(n):
        denoised = f(x_pred, sig[i])
        report(callback, i, x_pred, sig[i], sig[i], denoised)
        ds = [*ds, denoised][-max(predictor_order, corrector_order, 1):]
        k = 0 if i == 0 or (sig[i + 1] == 0 and not pece) else min(corrector_order, len(ds))
        k = min(k, n - i) if to_end else k
        if k:  # correct the step lam[i-1] -> lam[i] with D at the predicted point
            b = sa_coefficients(lam[i - k + 1 : i + 1], lam[i - 1], lam[i], tau)
            x = sig[i] / sig[i - 1] * math.exp(-(tau**2) * h) * x + sum(bj * d for bj, d in zip(b, ds[-k:]))
            if noise is not None:
                x = x + noise
            if pece:
                ds[-1] = denoised = f(x, sig[i])
        else:
            x = x_pred
        if sig[i + 1] == 0:
            return denoised
        tau = eta if s_tmin <= sig[i + 1] <= s_tmax else 0.0
        k = min(predictor_order, len(ds), n - 1 - i) if to_end else min(predictor_order, len(ds))
        b = sa_coefficients(lam[i - k + 1 : i + 1], lam[i], lam[i + 1], tau)
        h = lam[i + 1] - lam[i]
        x_pred = sig[i + 1] / sig[i] * math.exp(-(tau**2) * h) * x + sum(bj * d for bj, d in zip(b, ds[-k:]))
        noise = None
        if tau > 0 and s_noise > 0:
            noise = randn_like(x, generator) * (sig[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h)) * s_noise)
            x_pred = x_pred + noise
    return x_pred


def sample_sa_solver_pece(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                          s_noise=1.0, s_tmin=0.57, s_tmax=5.1, predictor_order=3, corrector_order=4):
    """SA-Solver (Xue et al. 2023) in PECE mode: predict, evaluate, correct, evaluate again."""
    return sample_sa_solver(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                            eta=eta, s_noise=s_noise, s_tmin=s_tmin, s_tmax=s_tmax, predictor_order=predictor_order,
                            corrector_order=corrector_order, pece=True)


# --- DPM-Solver (Lu et al. 2022) with noise prediction, for dpm_fast and dpm_adaptive ----------
# In sigma form (alpha = 1), lambda = -log sigma and h = lambda_t - lambda_s, eps = (x - D) / sigma:
# order 1 is x_t = x_s - sigma_t expm1(h) eps_s (= Euler); orders 2 and 3 are its Algorithms 1-2
# with intermediate points at r1 = 1/2 and r1, r2 = 1/3, 2/3 of the step in lambda.

def _dpm_solver_step(eps, x, sigma_s, sigma_t, order, eps_s, r1=None):
    """One singlestep DPM-Solver step of `order` (1-3) from sigma_s to sigma_t; sigma_s and
    sigma_t are floats or per-item [B, 1, ...] tensors. Returns (x_t, x_t of order - 1 or None)."""
    h = _log(sigma_s) - _log(sigma_t)
    x_1 = x - sigma_t * _expm1(h) * eps_s
    if order == 1:
        return x_1, None
    r1 = (0.5 if order == 2 else 1 / 3) if r1 is None else r1
    sigma_1 = sigma_s * _exp(-r1 * h)
    u_1 = x - sigma_1 * _expm1(r1 * h) * eps_s
    d_1 = eps(u_1, sigma_1) - eps_s
    x_2 = x_1 - sigma_t / (2 * r1) * _expm1(h) * d_1
    if order == 2:
        return x_2, x_1
    r2 = 2 / 3
    sigma_2 = sigma_s * _exp(-r2 * h)
    u_2 = (x - sigma_2 * _expm1(r2 * h) * eps_s
           - sigma_2 * (r2 / r1) * (_expm1(r2 * h) / (r2 * h) - 1) * d_1)
    d_2 = eps(u_2, sigma_2) - eps_s
    return x_1 - sigma_t / r2 * (_expm1(h) / h - 1) * d_2, x_2


def _log(v):
    return v.log() if isinstance(v, torch.Tensor) else math.log(v)


def _exp(v):
    return v.exp() if isinstance(v, torch.Tensor) else math.exp(v)


def _expm1(v):
    return v.expm1() if isinstance(v, torch.Tensor) else math.expm1(v)


def _endpoints(sig: list[float], name: str) -> tuple[float, float]:
    """sigma_max and the smallest positive sigma of a schedule (these solvers pick their own steps)."""
    positive = [s for s in sig if s > 0]
    if len(positive) < 2 or positive[0] <= positive[-1]:
        raise limner.LimnerError(f"{name} needs a falling schedule with two positive sigmas, got {sig}")
    return positive[0], positive[-1]


def sample_dpm_fast(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=0.0, s_noise=1.0):
    """DPM-Solver-fast (Lu et al. 2022, "DPM-Solver", sec. 3.4): as many model calls as the
    schedule has steps, spent on third-order steps equally spaced in log sigma from the
    schedule's first sigma to its last positive one (the rest of the schedule is not used),
    the remainder on one second- or first-order step. eta > 0 adds ancestral noise."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    sigma_max, sigma_min = _endpoints(sig, "dpm_fast")
    nfe = len(sig) - 1
    m = nfe // 3 + 1
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    lams = np.linspace(-math.log(sigma_max), -math.log(sigma_min), len(orders) + 1)

    def eps(x_, sigma):
        return to_d(x_, sigma, f(x_, sigma))

    for i, order in enumerate(orders):
        sigma, sigma_next = math.exp(-lams[i]), math.exp(-lams[i + 1])
        down, up = ancestral_step(sigma, sigma_next, eta)
        denoised = f(x, sigma)
        report(callback, i, x, sigma, sigma, denoised)
        x, _ = _dpm_solver_step(eps, x, sigma, down, order, to_d(x, sigma, denoised))
        if up > 0:
            x = x + randn_like(x, generator) * s_noise * up
    return x


def sample_dpm_adaptive(model, x, sigmas, *, extra_args=None, callback=None, generator=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81):
    """DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, "DPM-Solver", sec. 3.4 and
    app. C): each step computes an order-2 and an order-3 solution from shared model calls; their
    gap, scaled by max(atol, rtol * |x|) and RMS-averaged, is the error; a PID controller
    (Soederlind 2003; k-diffusion's coefficients) accepts the step when its proposed growth
    factor 1 + atan(f - 1) >= accept_safety, and rescales h by it. Every image has its own step
    sizes, so an image does not depend on what else is in the batch. Integrates from the
    schedule's first sigma to its last positive one; callback's info carries `nfe` so far."""
    if order not in (2, 3):
        raise limner.LimnerError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    if rtol <= 0 or atol <= 0 or h_init <= 0 or not 0 < accept_safety <= 1:
        raise limner.LimnerError(f"dpm_adaptive: rtol, atol and h_init must be > 0 and accept_safety in (0, 1], "
                                 f"got rtol={rtol}, atol={atol}, h_init={h_init}, accept_safety={accept_safety}")
    sigma_max, sigma_min = _endpoints(as_floats(sigmas), "dpm_adaptive")
    extra, b, view = extra_args or {}, x.shape[0], (-1,) + (1,) * (x.ndim - 1)
    nfe = 0

    def eps(x_, sigma):  # sigma: [B, 1, ...]
        nonlocal nfe
        nfe += 1
        return to_d(x_, sigma, model(x_, sigma.reshape(-1), **extra))

    lam_end = -math.log(sigma_min)
    lam = torch.full((b,), -math.log(sigma_max), dtype=torch.float64)
    h = torch.full((b,), float(h_init), dtype=torch.float64)
    exponents = torch.tensor([pcoeff + icoeff + dcoeff, -(pcoeff + 2 * dcoeff), dcoeff], dtype=torch.float64) / order
    inv_errors = None  # [3, B]: this step's and the last two accepted steps' 1 / error
    x_prev, step, eps_s = x, 0, None
    while (active := lam < lam_end - 1e-5).any():
        lam_next = torch.minimum(lam + h, torch.tensor(lam_end, dtype=torch.float64))
        lam_next = torch.where(active, lam_next, lam - 1.0)  # finished items: a dummy step, discarded
        s, t = (torch.exp(-v).to(x.dtype).view(view) for v in (lam, lam_next))
        eps_s = eps(x, s) if eps_s is None else eps_s  # kept after a step every image rejected
        x_high, x_low = _dpm_solver_step(eps, x, s, t, order, eps_s)
        delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = (((x_low - x_high) / delta).flatten(1).pow(2).mean(1).sqrt()).double()
        inv = 1 / (error + 1e-8)
        inv_errors = inv.expand(3, b).clone() if inv_errors is None else torch.cat([inv[None], inv_errors[1:]])
        factor = (inv_errors ** exponents[:, None]).prod(0)
        factor = 1 + torch.atan(factor - 1)
        accept = active & (factor >= accept_safety)
        inv_errors = torch.where(accept, torch.stack([inv_errors[0], inv_errors[0], inv_errors[1]]), inv_errors)
        h = torch.where(active, h * factor, h)
        keep = accept.view(view)
        x_prev, x = torch.where(keep, x_low, x_prev), torch.where(keep, x_high, x)
        if accept.any() and callback is not None:
            callback({"x": x, "i": step, "sigma": s.reshape(-1), "sigma_hat": s.reshape(-1),
                      "denoised": x - s * eps_s, "accepted": accept, "nfe": nfe})
        lam = torch.where(accept, lam_next, lam)
        step, eps_s = step + 1, None if accept.any() else eps_s
    return x


# name -> factory(**options) -> sampler, from the one catalogue (limner.plugins.SAMPLERS);
# <name>_cfg_pp: the same function, guided with CFG++ by the framework (limner.sampling.Guided)
FACTORIES = {name: sampler_spec(globals()[f"sample_{name}"], name).factory for name, _, _ in CATALOGUE}
FACTORIES.update({f"{name}_cfg_pp": cfg_pp_spec(globals()[f"sample_{name}"], name).factory
                  for name, _, cfg_pp in CATALOGUE if cfg_pp})
