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
from limner.sampling import (
    BrownianNoise, ancestral_step, as_floats, bind, bind_update, churn, randn_like, report, sampler_spec, to_d,
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
    """Ancestral sampling with Euler steps (Song et al. 2021; k-diffusion's euler_ancestral)."""
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        x = x + to_d(x, sig[i], denoised) * (down - sig[i])
        if up > 0:
            x = x + randn_like(x, generator) * s_noise * up
    return x


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
    sig, f = as_floats(sigmas), bind(model, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = f(x, sig[i])
        report(callback, i, x, sig[i], sig[i], denoised)
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        if down == 0:
            x = x + to_d(x, sig[i], denoised) * (down - sig[i])
        else:
            h = math.log(sig[i]) - math.log(down)  # step in lambda = -log(sigma)
            sigma_mid = sig[i] * math.exp(-h / 2)
            x_2 = (sigma_mid / sig[i]) * x - math.expm1(-h / 2) * denoised
            x = (down / sig[i]) * x - math.expm1(-h) * f(x_2, sigma_mid)
        if up > 0:
            x = x + randn_like(x, generator) * s_noise * up
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


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}
# name -> factory(**options) -> sampler; limner.plugins registers them under these names
FACTORIES = {name: sampler_spec(fn, name).factory for name, fn in SAMPLERS.items()}
