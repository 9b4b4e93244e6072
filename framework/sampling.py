"""What every sampler shares: the denoiser call, Karras churn, ancestral steps, Brownian
noise, classifier-free guidance, and `sample()` that ties a sampler to a schedule.

Conventions are k-diffusion's (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): x = x0 + sigma * eps, a denoiser D(x, sigma) -> x0,
and sigmas descending to 0. Sampler functions take sigmas as any 1-D sequence and do their
step-size arithmetic on Python floats, so the loop never synchronises a GPU.
"""
from __future__ import annotations

import bisect
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch

from limner.kernels import guided_update

from .errors import LimnerError, UnknownComponentError
from .registry import ComponentSpec, check_options, get_component, registry, spelling

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
SAMPLER_ARGS = ("model", "x", "sigmas", "extra_args", "callback", "generator")


# --- helpers used by the sampler functions -------------------------------------------

def as_floats(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """Sigmas as Python floats (one host copy, then no device syncs in the loop)."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.ndim != 1:
            raise LimnerError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        return sigmas.detach().double().cpu().tolist()
    return [float(s) for s in sigmas]


def bind(model: Denoiser, x: torch.Tensor, extra_args: dict | None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """model as f(x, sigma: float): sigma broadcast to a [B] tensor, extra_args passed on."""
    extra = extra_args or {}
    if isinstance(model, Guided) and model.mode == "cfg_pp":
        raise LimnerError("CFG++ changes how a sampler's update reads x, which only samplers whose every step "
                          "goes through the framework's fused update (bind_update) allow; `limner plugins` lists "
                          "them as <name>_cfg_pp")

    def denoise(x_: torch.Tensor, sigma: float) -> torch.Tensor:
        return model(x_, x_.new_full((x_.shape[0],), sigma), **extra)

    return denoise


def bind_update(model: Denoiser, x: torch.Tensor, extra_args: dict | None) -> Callable[..., tuple]:
    """model fused with a linear sampler update, as step(x, sigma, a, b, old=None, e=0, noise=None,
    c=0, x_from=None) -> (x', D) with x' = a x + b D + e old + c noise, D evaluated at x. A
    two-stage step evaluates at its midpoint but updates from where it began: x_from is then
    the x of the update (it must be the point of the call before). Around a `Guided` model the
    guidance combine happens inside the same fused pass (limner.kernels.guided_update)."""
    extra = extra_args or {}
    last: list = [None, None]  # CFG++: the point of the previous call and its guidance shift

    def step(x_: torch.Tensor, sigma: float, a: float, b: float, old: torch.Tensor | None = None,
             e: float = 0.0, noise: torch.Tensor | None = None, c: float = 0.0, x_from: torch.Tensor | None = None):
        s = x_.new_full((x_.shape[0],), sigma)
        update_x = x_ if x_from is None else x_from
        if isinstance(model, Guided):
            with_cond, without = model.branches(x_, s, **extra)
            guidance = model.guidance
            if model.mode == "cfg_pp":  # CFG++: the x part of the update is x + D_guided - D_uncond at that x
                shift = guidance * (with_cond - without)
                if x_from is not None:
                    if last[0] is not x_from:
                        raise LimnerError("CFG++: x_from must be the point of the previous step call")
                    update_x = x_from + last[1]
                else:
                    update_x = x_ + shift
                last[:] = [x_, shift]
        else:
            with_cond, without, guidance = model(x_, s, **extra), None, 1.0
        return guided_update(update_x, with_cond, without, guidance, a, b, old, e, noise, c)

    return step


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step; eta=1 is DDPM's posterior, eta=0 deterministic."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def randn_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from `generator` (the global RNG if None),
    or row by row from a list of generators, one per batch item: then each item's noise is its
    own stream, and an image does not change with what else is in the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise LimnerError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per item")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


def item_generators(seed: int | Sequence[int], items: int, per_prompt: int,
                    device: torch.device | str) -> list[torch.Generator]:
    """One generator per batch item: image j of a prompt is seeded with seed + j (or, given one
    seed per prompt, that prompt's seed + j), so a prompt draws the same images alone or in any
    batch, and `--seed s+j` alone redraws the j-th image of a `--seed s --num n` batch."""
    prompts = items // per_prompt
    seeds = [seed] * prompts if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != prompts:
        raise LimnerError(f"{len(seeds)} seeds for {prompts} prompts: give one seed, or one per prompt")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED - (per_prompt - 1)]
    if bad:
        raise LimnerError(f"seed {bad[0]} is out of range: a seed is a whole number from 0 to {MAX_SEED} "
                          f"(with {per_prompt} images per prompt, image j takes seed + j)")
    return [torch.Generator(device).manual_seed(seeds[k // per_prompt] + k % per_prompt) for k in range(items)]


def churn(x: torch.Tensor, sigma: float, n_steps: int, generator: torch.Generator | None,
          s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022 Alg. 2: raise sigma by gamma and add the matching noise."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + randn_like(x, generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def report(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, sigma_hat: float,
           denoised: torch.Tensor) -> None:
    """Call the per-step callback with k-diffusion's dict keys."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


class BrownianNoise:
    """A Brownian path W(sigma), drawn lazily from one generator with Brownian bridges.

    SDE samplers ask for the increment over [sigma_next, sigma] and, in two-stage methods,
    over a sub-interval of it first; bridging keeps those draws one consistent path (the
    role torchsde's BrownianTree plays in k-diffusion). Returns standardised increments.
    """

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None):
        self.like, self.generator = x, generator
        self.times: list[float] = [0.0]
        self.values: list[torch.Tensor] = [torch.zeros_like(x)]

    def _at(self, t: float) -> torch.Tensor:
        k = bisect.bisect_left(self.times, t)
        if k < len(self.times) and self.times[k] == t:
            return self.values[k]
        z = randn_like(self.like, self.generator)
        if k == len(self.times):  # beyond the path: an independent increment
            w = self.values[-1] + math.sqrt(t - self.times[-1]) * z
        else:  # between two known points: Brownian bridge
            t0, t1, w0, w1 = self.times[k - 1], self.times[k], self.values[k - 1], self.values[k]
            frac = (t - t0) / (t1 - t0)
            w = w0 + frac * (w1 - w0) + math.sqrt((t - t0) * (t1 - t) / (t1 - t0)) * z
        self.times.insert(k, t)
        self.values.insert(k, w)
        return w

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        lo, hi = sorted((sigma, sigma_next))
        return (self._at(hi) - self._at(lo)) / math.sqrt(hi - lo)


# --- components --------------------------------------------------------------------

def options_spec(kind: str, fn: Callable, name: str, call_args: tuple[str, ...],
                 aliases: tuple[str, ...] = ()) -> ComponentSpec:
    """A ComponentSpec whose factory binds fn's options (every parameter not in call_args)
    and returns fn ready to call, so configs and the CLI can set options by name."""
    def factory(**options: Any) -> Callable[..., torch.Tensor]:
        check_options(kind, name, factory, options)
        bound = functools.wraps(fn)(functools.partial(fn, **options))
        bound.limner_name = name  # type: ignore[attr-defined]  # what errors call it
        return bound

    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in call_args]
    factory.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    factory.__doc__ = fn.__doc__
    return ComponentSpec(name, factory, aliases)


def sampler_spec(fn: Callable, name: str, aliases: tuple[str, ...] = ()) -> ComponentSpec:
    """A ComponentSpec for a k-diffusion-style sampler; options: eta, s_churn, order, ..."""
    return options_spec("samplers", fn, name, SAMPLER_ARGS, aliases)


def cfg_pp_spec(fn: Callable, name: str) -> ComponentSpec:
    """<name>_cfg_pp: the sampler `fn` itself, marked so the framework guides it with CFG++."""
    base = sampler_spec(fn, name).factory

    def factory(**options: Any) -> Callable[..., torch.Tensor]:
        sampler = base(**options)  # a fresh partial each call: marking it marks no other
        sampler.guidance_mode = "cfg_pp"  # type: ignore[attr-defined]
        sampler.limner_name = f"{name}_cfg_pp"  # type: ignore[attr-defined]
        return sampler

    factory.__signature__ = base.__signature__  # type: ignore[attr-defined]
    factory.__doc__ = f"{fn.__doc__}\n\nGuided with CFG++ (Chung et al. 2024): see limner.sampling.Guided."
    return ComponentSpec(f"{name}_cfg_pp", factory)


def schedule_spec(fn: Callable, name: str, aliases: tuple[str, ...] = ()) -> ComponentSpec:
    """A ComponentSpec for a schedule fn(n, sigma_min, sigma_max, *, device, **options)."""
    return options_spec("schedules", fn, name, ("n", "sigma_min", "sigma_max", "device"), aliases)


# --- classifier-free guidance ----------------------------------------------------------

def _cat(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, objects with .cat, dataclasses
    of tensors, dicts."""
    if hasattr(a, "cat") and not isinstance(a, torch.Tensor):
        return a.cat(b)
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if is_dataclass(a):
        return replace(a, **{f.name: _cat(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if a is None:
        return None
    raise LimnerError(f"cannot batch a conditioning of type {type(a).__name__} for guidance")


GUIDANCE_MODES = ("cfg", "cfg_pp")


def guidance_mode(sampler: Callable) -> str:
    """'cfg_pp' for a sampler registered as <name>_cfg_pp, else 'cfg'."""
    return getattr(sampler, "guidance_mode", "cfg")


class Guided:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser, applied once here
    so no sampler re-implements it: D = D(x|uncond) + g * (D(x|cond) - D(x|uncond)),
    with the two branches evaluated in one batched call.

    mode "cfg_pp" is CFG++ (Chung et al. 2024): a step lands on the guided x0 estimate but
    re-noises along the *unconditional* noise estimate, x' = D_g + s' (x - D_u) / s for DDIM /
    Euler; in any update x' = a x + b D_g + ... that is x replaced by x + D_g - D_u, which
    bind_update applies for every sampler built on it (g is CFG++'s lambda, in [0, 1] in the paper)."""

    def __init__(self, model: Denoiser, guidance: float, mode: str = "cfg"):
        if mode not in GUIDANCE_MODES:
            raise LimnerError(f"unknown guidance mode {mode!r}. Valid: {', '.join(GUIDANCE_MODES)}.")
        self.model, self.guidance, self.mode = model, float(guidance), mode

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None, uncond: Any = None,
                 **kwargs: Any) -> torch.Tensor:
        with_cond, without = self.branches(x, sigma, cond, uncond, **kwargs)
        return with_cond if without is None else without + self.guidance * (with_cond - without)

    def branches(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None, uncond: Any = None,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D(x|cond), D(x|uncond)) from one batched call; (D(x|cond), None) without guidance."""
        if self.mode == "cfg_pp" and uncond is None:
            raise LimnerError("CFG++ needs the unconditional branch: pass uncond (the empty prompt's embedding)")
        if uncond is None or (self.guidance == 1.0 and self.mode == "cfg"):
            return self.model(x, sigma, cond=cond, **kwargs), None
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=_cat(cond, uncond), **kwargs)
        with_cond, without = both.chunk(2)
        return with_cond, without


# --- the one entry point pipelines use -------------------------------------------------

def make_sigmas(schedule: str | Callable, steps: int, sigma_min: float, sigma_max: float,
                device: torch.device | str | None = None, **options: Any) -> torch.Tensor:
    """steps+1 descending sigmas ending in 0, from a schedule name or function."""
    if steps < 1:
        raise LimnerError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise LimnerError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    fn = get_component("schedules", schedule).load()(**options) if isinstance(schedule, str) else schedule
    return fn(steps, sigma_min, sigma_max, device=device)


def explicit_sigmas(values: Sequence[float], device: torch.device | str | None = None) -> torch.Tensor:
    """A hand-written schedule (ComfyUI's ManualSigmas / k-diffusion's sigmas argument): at least
    two finite sigmas, falling, >= 0; as given (end at 0 for a clean image)."""
    try:
        sig = [float(v) for v in values]
    except (TypeError, ValueError):
        raise LimnerError(f"sigmas must be numbers, got {values!r:.80}") from None
    if len(sig) < 2 or not all(math.isfinite(v) and v >= 0 for v in sig) or any(b >= a for a, b in zip(sig, sig[1:])):
        raise LimnerError(f"sigmas must be two or more finite numbers >= 0, strictly falling (e.g. 14.6,3.1,0.6,0), "
                          f"got {','.join(f'{v:g}' for v in sig)}")
    return torch.tensor(sig, dtype=torch.float64, device=device)


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """A1111's "DPM++ 2M Karras" is a sampler and a schedule in one name: (sampler, schedule)
    when `name` is no sampler but a sampler's name followed by a schedule's; else (name, None)."""
    reg = registry()
    try:
        reg.component("samplers", name)
        return name, None
    except UnknownComponentError:
        pass
    spelled = spelling(name)
    for schedule in reg.names("schedules"):
        if spelled.endswith(f"_{schedule}"):
            try:
                return reg.component("samplers", spelled[: -len(schedule) - 1]).spec.name, schedule
            except UnknownComponentError:
                continue
    return name, None


def resolve_sampler(sampler: str | Callable, **options: Any) -> Callable[..., torch.Tensor]:
    """A sampler function from a name (options bound) or a callable passed through."""
    return get_component("samplers", sampler).load()(**options) if isinstance(sampler, str) else sampler


def progress_bar(total: int, callback: Callback | None = None, desc: str = "sampling") -> Callback:
    """A per-step callback that advances a tqdm bar, then calls `callback`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)

    def step(info: dict[str, Any]) -> None:
        bar.update(1)
        if info["i"] == total - 1:
            bar.close()
        if callback is not None:
            callback(info)

    return step


def sample(model: Denoiser, noise: torch.Tensor, *, sampler: str | Callable, schedule: str | Callable | None = None,
           steps: int = 20, sigmas: Sequence[float] | torch.Tensor | None = None, sigma_min: float = 0.002,
           sigma_max: float = 80.0, guidance: float = 1.0, cond: Any = None, uncond: Any = None,
           generator: torch.Generator | list[torch.Generator] | None = None, sampler_options: dict | None = None,
           schedule_options: dict | None = None, callback: Callback | None = None, progress: bool = False,
           init: torch.Tensor | None = None, strength: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Draw x0 from unit `noise`: the one sampling path (pipelines call it too). A named sampler
    (or the function itself) over the sigmas of a named schedule, or over explicit falling
    `sigmas`; guidance applied once (Guided). With `init`, image-to-image: the last `strength`
    of the steps redraw init + noise (SDEdit, Meng et al. 2022); with `init` and `mask` (1 =
    redraw), inpainting: the known pixels are kept at every step (KeepKnown)."""
    if sigmas is not None:
        sigmas = sigmas.to(noise.device) if isinstance(sigmas, torch.Tensor) else explicit_sigmas(sigmas, noise.device)
    else:
        if schedule is None:
            raise LimnerError("sample() needs a schedule (with steps) or explicit sigmas")
        sigmas = make_sigmas(schedule, steps, sigma_min, sigma_max, device=noise.device, **(schedule_options or {}))
    fn = resolve_sampler(sampler, **(sampler_options or {}))
    mode = guidance_mode(fn)
    guided: Any = Guided(model, guidance, mode)
    x = noise * float(sigmas[0])
    if init is not None and mask is None:
        if not 0 < strength <= 1:
            raise LimnerError(f"strength must be in (0, 1], got {strength}")
        sigmas = sigmas[int(round((len(sigmas) - 1) * (1 - strength))):]
        x = init + noise * float(sigmas[0])
    elif mask is not None:
        check_mask_init(init, mask)
        if mode == "cfg_pp":  # KeepKnown hides the two branches CFG++ reads from the fused update
            name = sampler if isinstance(sampler, str) else getattr(sampler, "limner_name", "this sampler")
            raise LimnerError(f"{name} (CFG++) does not combine with --mask yet; inpaint with "
                              f"{name.removesuffix('_cfg_pp')} instead")
        guided = KeepKnown(guided, init, mask)
    if callback is not None:  # the step count beside k-diffusion's keys: a progress display needs it
        callback = functools.partial(_with_steps, callback, len(sigmas) - 1)
    if progress:
        callback = progress_bar(len(sigmas) - 1, callback)
    out = fn(guided, x, sigmas, extra_args={"cond": cond, "uncond": uncond}, callback=callback, generator=generator)
    return guided.blend(out) if mask is not None else out


def _with_steps(callback: Callback, steps: int, info: dict[str, Any]) -> None:
    callback({**info, "steps": steps})


def check_mask_init(init: Any, mask: Any) -> None:
    """A mask is of an init image: refused without one."""
    if mask is not None and init is None:
        raise LimnerError("a mask (--mask) needs an init image (--init-image): the picture whose masked part "
                          "is redrawn")


class KeepKnown:
    """Inpainting with any sampler and an ordinary model: the x0 estimate is replaced by the
    known image outside the mask, so only the masked region is generated (as in blended
    diffusion, Avrahami et al. 2022, applied to the denoised estimate)."""

    def __init__(self, model, known: torch.Tensor, redraw: torch.Tensor):
        self.model, self.known, self.redraw = model, known, redraw

    def __call__(self, x, sigma, **kwargs):
        return self.blend(self.model(x, sigma, **kwargs))

    def blend(self, x0: torch.Tensor) -> torch.Tensor:
        return self.redraw * x0 + (1 - self.redraw) * self.known
