"""Built-in noise schedules: schedule(n, sigma_min, sigma_max, *, device=None) -> n+1 sigmas.

Sigmas descend from about sigma_max and end in a final 0, as k-diffusion's get_sigmas_*.
`simple`, `normal`, `sgm_uniform` and `beta` follow ComfyUI's definitions on a model's
sigma table (`table="loglinear"` for continuous-sigma models, or a DDPM beta schedule).
"""
from __future__ import annotations

import math

import numpy as np
import torch

import limner
from limner.noise import SigmaTable, ddpm_sigmas
from limner.sampling import schedule_spec

F64 = torch.float64


def _finish(sigmas: torch.Tensor, device) -> torch.Tensor:
    """Append the final 0 and move to `device`; float64, since samplers read them as floats."""
    sigmas = sigmas.to(F64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


def karras(n, sigma_min, sigma_max, *, rho=7.0, device=None):
    """Karras et al. 2022 (eq. 5): uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, device)


def exponential(n, sigma_min, sigma_max, *, device=None):
    """Uniform steps in log(sigma) (k-diffusion's get_sigmas_exponential)."""
    return _finish(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=F64).exp(), device)


def polyexponential(n, sigma_min, sigma_max, *, rho=1.0, device=None):
    """Polynomial ramp in log(sigma); rho=1 is `exponential` (k-diffusion)."""
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    log_lo, log_hi = math.log(sigma_min), math.log(sigma_max)
    return _finish((ramp * (log_hi - log_lo) + log_lo).exp(), device)


def linear(n, sigma_min, sigma_max, *, device=None):
    """Uniform steps in sigma."""
    return _finish(torch.linspace(sigma_max, sigma_min, n, dtype=F64), device)


def simple(n, sigma_min, sigma_max, *, table="loglinear", device=None):
    """ComfyUI's `simple`: every (len/n)-th entry of the model's sigma table, from the top."""
    sig = SigmaTable.named(table, sigma_min, sigma_max).sigmas
    stride = len(sig) / n
    return _finish(torch.stack([sig[-(1 + int(k * stride))] for k in range(n)]), device)


def _uniform_timesteps(n, sigma_min, sigma_max, table, endpoint):
    tab = SigmaTable.named(table, sigma_min, sigma_max)
    start, end = tab.timestep(torch.tensor(sigma_max)), tab.timestep(torch.tensor(sigma_min))
    ts = torch.linspace(float(start), float(end), n + (0 if endpoint else 1), dtype=F64)
    return tab.sigma(ts if endpoint else ts[:-1])


def normal(n, sigma_min, sigma_max, *, table="loglinear", device=None):
    """ComfyUI's `normal`: n timesteps uniform from sigma_max's to sigma_min's, inclusive."""
    return _finish(_uniform_timesteps(n, sigma_min, sigma_max, table, endpoint=True), device)


def sgm_uniform(n, sigma_min, sigma_max, *, table="loglinear", device=None):
    """ComfyUI's `sgm_uniform` (Stability's generative-models): as `normal`, last timestep dropped."""
    return _finish(_uniform_timesteps(n, sigma_min, sigma_max, table, endpoint=False), device)


def beta(n, sigma_min, sigma_max, *, alpha=0.6, beta=0.6, table="loglinear", device=None):
    """ComfyUI's `beta` (Lee et al. 2024, "Beta Sampling is All You Need"): timesteps at
    quantiles of a Beta(alpha, beta) distribution, repeated timesteps dropped."""
    from scipy.stats import beta as beta_dist

    sig = SigmaTable.named(table, sigma_min, sigma_max).sigmas
    last = len(sig) - 1
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta) * last).astype(int)
    picked = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    return _finish(sig[picked], device)


def _ddpm(kind, n, sigma_min, sigma_max, device):
    """n training timesteps, evenly spaced (DDIM's 'uniform' skip) over those within range."""
    sig = ddpm_sigmas(kind)
    inside = ((sig >= sigma_min) & (sig <= sigma_max)).nonzero().flatten()
    if len(inside) == 0:
        raise limner.LimnerError(
            f"no {kind} DDPM timestep has sigma in [{sigma_min}, {sigma_max}]; "
            f"its sigmas span [{float(sig[0]):.4g}, {float(sig[-1]):.4g}]")
    ts = torch.linspace(float(inside[-1]), float(inside[0]), n, dtype=F64).round().long()
    return _finish(sig[ts], device)


def ddpm_linear(n, sigma_min, sigma_max, *, device=None):
    """DDPM's linear betas (Ho et al. 2020) as sigmas, at n evenly spaced timesteps."""
    return _ddpm("linear", n, sigma_min, sigma_max, device)


def ddpm_cosine(n, sigma_min, sigma_max, *, device=None):
    """The cosine schedule (Nichol & Dhariwal 2021) as sigmas, at n evenly spaced timesteps."""
    return _ddpm("cosine", n, sigma_min, sigma_max, device)


def vp(n, sigma_min, sigma_max, *, beta_d=19.9, beta_min=0.1, device=None):
    """Uniform time steps of the VP SDE (Song et al. 2021), sigma(t)^2 = exp(beta_d t^2 / 2 +
    beta_min t) - 1, between the times where sigma is sigma_max and sigma_min; k-diffusion's
    get_sigmas_vp is the case sigma_max = sigma(1), sigma_min = sigma(eps_s)."""
    def time_of(sigma):
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d

    t = torch.linspace(time_of(sigma_max), time_of(sigma_min), n, dtype=F64)
    return _finish(torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t)), device)


def laplace(n, sigma_min, sigma_max, *, mu=0.0, beta=0.5, device=None):
    """log(sigma) at the quantiles 1 - k/(n-1) of a Laplace(mu, beta) distribution, clamped
    to [sigma_min, sigma_max] (Hang et al. 2024, "Improved Noise Schedule for Diffusion
    Training"): steps crowd where log sigma is near mu."""
    p = 1 - torch.linspace(0, 1, n, dtype=F64)
    log_sigma = mu - beta * torch.sign(p - 0.5) * torch.log(1 - 2 * (p - 0.5).abs() + 1e-5)
    return _finish(log_sigma.exp().clamp(sigma_min, sigma_max), device)


def kl_optimal(n, sigma_min, sigma_max, *, device=None):
    """Uniform steps in arctan(sigma) (the KL-optimal schedule of Sabour et al. 2024, "Align
    Your Steps", for data at the origin)."""
    w = torch.linspace(0, 1, n, dtype=F64)
    return _finish(torch.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)), device)


# Align Your Steps' optimised 10-step schedules (Sabour et al. 2024, NVIDIA's published tables)
AYS_TABLES = {
    "sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def align_your_steps(n, sigma_min, sigma_max, *, model="sd1", device=None):
    """Align Your Steps (Sabour et al. 2024): the paper's 10-step schedule for `model` (sd1,
    sdxl, svd), log-linearly interpolated to n steps, its last level replaced by 0 as the
    authors do. Its log-sigmas are mapped affinely onto [sigma_min, sigma_max]: at the table's
    own range (SD: 0.0292-14.61) the schedule is the paper's exactly."""
    if model not in AYS_TABLES:
        raise limner.LimnerError(f"align_your_steps: unknown model {model!r}; valid: {', '.join(AYS_TABLES)}")
    table = np.log(np.array(AYS_TABLES[model])[::-1])  # ascending log sigma
    log_sigma = np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(table)), table)[::-1]
    lo, hi = table[0], table[-1]
    scaled = math.log(sigma_min) + (log_sigma - lo) * (math.log(sigma_max) - math.log(sigma_min)) / (hi - lo)
    return _finish(torch.from_numpy(np.exp(scaled[:-1]).copy()), device)


def ddim_uniform(n, sigma_min, sigma_max, *, table="loglinear", device=None):
    """ComfyUI's `ddim_uniform` (DDIM's "uniform" timestep skip, Song et al. 2021): every
    (len // n)-th entry of the model's sigma table from its second to its end, largest first.
    NOTE: as in ComfyUI, the stride can fit once more than asked (1000 entries, 6 steps: 7)."""
    sig = SigmaTable.named(table, sigma_min, sigma_max).sigmas
    picked = list(range(1, len(sig), max(len(sig) // n, 1)))
    return _finish(sig[picked[::-1]], device)


def linear_quadratic(n, sigma_min, sigma_max, *, threshold_noise=0.025, linear_steps=None, device=None):
    """Genmo's Mochi schedule (ComfyUI's `linear_quadratic`, 2024): noise fraction 1 - t with t
    rising linearly to `threshold_noise` over the first `linear_steps` (default n // 2) steps,
    then along the quadratic that reaches 1 at step n with a continuous slope; times sigma_max.
    Made for flow models (sigma in [0, 1]); sigma_min is not used."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=F64, device=device)
    k = n // 2 if linear_steps is None else int(linear_steps)
    if not 0 < k < n:
        raise limner.LimnerError(f"linear_quadratic: linear_steps must be in 1..{n - 1}, got {linear_steps}")
    quad_steps = n - k
    diff = k - threshold_noise * n
    a = diff / (k * quad_steps**2)
    b = threshold_noise / k - 2 * diff / quad_steps**2
    t = [i * threshold_noise / k for i in range(k)] + [a * i**2 + b * i + a * k**2 for i in range(k, n)] + [1.0]
    return torch.tensor([(1 - v) * sigma_max for v in t], dtype=F64, device=device)


SCHEDULES = {
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "linear": linear,
    "simple": simple,
    "normal": normal,
    "sgm_uniform": sgm_uniform,
    "beta": beta,
    "ddpm_linear": ddpm_linear,
    "ddpm_cosine": ddpm_cosine,
    "vp": vp,
    "laplace": laplace,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
    "ddim_uniform": ddim_uniform,
    "linear_quadratic": linear_quadratic,
}
# name -> factory(**options) -> schedule; limner.plugins registers them under these names
FACTORIES = {name: schedule_spec(fn, name).factory for name, fn in SCHEDULES.items()}
