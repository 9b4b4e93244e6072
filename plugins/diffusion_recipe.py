"""The `diffusion` recipe, whole in one module like `gan` and `vae`: text-to-image diffusion
trained with the EDM loss (Karras et al. 2022) and drawn by any registered sampler. The run
config's schema, the model (text encoder + denoiser), the trainer's step and the pipeline; the
loop, checkpoints and resume are limner.train.TrainerBase's, sampling is limner.sampling.sample.

    limner train configs/shapes-tiny.toml        # recipe = "diffusion"
    pipe = limner.load_pipeline("runs/shapes")
    images = pipe(["a red circle at the top left"], sampler="dpmpp_2m", schedule="karras",
                  steps=20, guidance=3.0, seed=0)
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from limner.config import ComponentConfig, bounded, component
from limner.diffusion import training_sigmas
from limner.ema import EMA
from limner.errors import LimnerError
from limner.pipeline import (
    PipelineBase,
    autocast,
    check_mask_size,
    freed_memory_kept,
    hold_weights,
    image_tensor,
    inference_compile,
    kept_psnr,
    kernel_convs,
    mask_tensor,
    precision,
)
from limner.protocols import TextEmbedding, WithImage
from limner.recipes import Recipe
from limner.sampling import (
    check_mask_init,
    explicit_sigmas,
    guidance_mode,
    make_sigmas,
    resolve_sampler,
    sample,
    split_sampler_name,
)
from limner.text_cache import EmbeddingCache, with_phrase_tokens
from limner.train import DataConfig, LoopConfig, RunConfig, TrainerBase, adamw, step_generator

# --- the run config ----------------------------------------------------------------------


@dataclass
class DiffusionDataConfig(DataConfig):
    caption_dropout: float = bounded(0.1, ge=0, le=1)  # the empty prompt's share: what guidance contrasts with


@dataclass
class ModelConfig:
    """Which text encoder and denoiser, by name with their options (no defaults: the framework
    names no component; the shipped configs do)."""

    text_encoder: ComponentConfig = component("text_encoders")
    denoiser: ComponentConfig = component("denoisers")
    # latent diffusion (Rombach et al. 2022): the denoiser works on this autoencoder's latents
    autoencoder: ComponentConfig | None = field(default=None, metadata={"kind": "autoencoders"})
    image_size: int = bounded(32, ge=1, le=4096)
    channels: int = bounded(3, ge=1, le=64)
    phrase_tokens: bool = False  # encode the prompt clause by clause (text_cache.with_phrase_tokens)


@dataclass(kw_only=True)
class OptimConfig(LoopConfig):
    """[train] of the diffusion recipe (the loop's own settings come from LoopConfig)."""

    lr: float = bounded(2e-4, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    warmup: int = bounded(200, ge=0)
    ema: float = bounded(0.999, ge=0, lt=1)
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping
    mixed_precision: str = "bf16"  # used on GPU only: "no", "bf16" or "fp16"
    compile: bool = False  # torch.compile the denoiser (first steps pay the compile time)
    channels_last: bool = True  # NHWC activations: oneDNN's (and tensor cores') fast layout; same math
    p_mean: float = -1.2  # log-normal training sigmas (EDM's P_mean, P_std)
    p_std: float = bounded(1.2, gt=0)
    # text feature noise (LAFITE, Zhou et al. 2022, eq. 3): each real prompt's token and pooled
    # vectors h -> h + text_noise * |h| * e / |e|, e ~ N(0, I), fresh every step, so that the
    # denoiser answers a neighbourhood of each training caption's features, not its exact point
    # (0: off; the empty prompt, what guidance contrasts with, is never perturbed)
    text_noise: float = bounded(0.0, ge=0, le=10)


@dataclass
class SampleConfig:
    """How images are drawn: in training's sample grids, `limner sample` and the demo."""

    sampler: ComponentConfig = component("samplers")
    schedule: ComponentConfig = component("schedules")
    steps: int = bounded(20, ge=1, le=10_000)
    guidance: float = bounded(3.0, ge=0)
    # float32 bounds: the denoiser embeds log(sigma) and scales by 1/sqrt(sigma^2 + sigma_data^2)
    sigma_min: float = bounded(0.002, ge=1e-6)
    sigma_max: float = bounded(80.0, gt=0, le=1e5)
    prompts: list[str] = field(default_factory=list)
    compile: bool = False  # torch.compile the denoiser for sampling: pays ~30 s once per batch size
    # "bfloat16" (bf16): the denoiser and the autoencoder's decoder in bf16 autocast, on a CPU with
    # native bf16 (avx512_bf16, AMX) or a GPU; the sampler's state stays float32
    dtype: str = "float32"
    channels_last: bool = True  # NHWC activations: oneDNN's (and tensor cores') fast layout; same math
    # LoRA files merged in when the checkpoint is loaded for sampling ("FILE[:STRENGTH]", each a
    # file inside the checkpoint folder, named relative to it); training's grids draw without them
    lora: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """A diffusion run."""

    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# --- the model ---------------------------------------------------------------------------


class TextToImage(nn.Module):
    """encode(prompts) -> TextEmbedding; forward(x, sigma, cond) -> x0 estimate, where x is an
    image or, with an autoencoder, its latent (`latent`: the [C, H, W] the denoiser works on;
    to_latent and to_image map between the two, the identity without an autoencoder)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = cfg.text_encoder.build()
        self.autoencoder = cfg.autoencoder.build() if cfg.autoencoder is not None else None
        self.latent = (self.autoencoder.latent_shape(cfg.channels, cfg.image_size) if self.autoencoder is not None
                       else (cfg.channels, cfg.image_size, cfg.image_size))
        self.denoiser = cfg.denoiser.build(context_dim=self.text_encoder.dim, in_channels=self.latent[0],
                                           image_size=self.latent[1])
        self.text_cache = EmbeddingCache()

    def to_latent(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] as the denoiser sees them (the autoencoder's scaled latents)."""
        if self.autoencoder is None:
            return images
        with torch.no_grad():
            return self.autoencoder.encode(images, generator)

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.autoencoder is None else self.autoencoder.decode(x)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """The prompts' embedding; a frozen encoder's come from the cache when seen before."""
        if self.cfg.phrase_tokens:
            return with_phrase_tokens(lambda ps: self.text_cache.encode(self.text_encoder, ps), prompts,
                                      whole=getattr(self.denoiser, "reads_pooled", True))
        return self.text_cache.encode(self.text_encoder, prompts)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextEmbedding | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, cond)

    def training_loss(self, images: torch.Tensor, captions: list[str], sigma: torch.Tensor,
                      noise: torch.Tensor, text_noise: float = 0.0) -> torch.Tensor:
        """Mean denoising loss of a batch (of latents, with an autoencoder, which stays frozen);
        text encoding inside, so DDP sees one forward. `text_noise`: [train] text_noise."""
        cond = self.encode(captions)
        if text_noise:
            cond = perturbed(cond, text_noise, torch.tensor([c != "" for c in captions], device=cond.mask.device))
        return self.denoiser.loss(self.to_latent(images), cond, sigma, noise).mean()


def perturbed(cond: TextEmbedding, scale: float, rows: torch.Tensor) -> TextEmbedding:
    """`cond` with each vector h of the chosen `rows` [B] moved by scale * |h| along a random
    direction (LAFITE's feature perturbation, Zhou et al. 2022), from the global RNG (seeded each
    step: train.step_generator); padding stays zero."""

    def move(h: torch.Tensor) -> torch.Tensor:
        e = torch.randn(h.shape, dtype=h.dtype).to(h.device)
        # the size is a constant to autograd: a trained encoder gets no push to shrink its outputs
        size = scale * h.detach().norm(dim=-1, keepdim=True)
        step = e * (size / e.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return h + step * rows.view(-1, *[1] * (h.ndim - 1)).to(h.dtype)

    tokens = move(cond.tokens) * cond.mask[..., None].to(cond.tokens.dtype)
    clauses = None if cond.clauses is None else move(cond.clauses) * cond.clause_mask[..., None].to(cond.clauses.dtype)
    return dataclasses.replace(cond, tokens=tokens, pooled=move(cond.pooled), clauses=clauses)


class TrainStep(nn.Module):
    """The module DDP wraps: text encoding and the denoiser in one forward."""

    def __init__(self, model: TextToImage, text_noise: float = 0.0):
        super().__init__()
        self.model, self.text_noise = model, text_noise

    def forward(self, images, captions, sigma, noise):
        return self.model.training_loss(images, captions, sigma, noise, self.text_noise)


# --- the trainer -------------------------------------------------------------------------


def lr_at(step: int, cfg: OptimConfig) -> float:
    """The learning rate of `step`: a linear warm-up to cfg.lr over cfg.warmup steps."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


class Trainer(TrainerBase):
    """The model, its EMA and one AdamW; each step the EDM loss on a batch."""

    def __init__(self, cfg: TrainConfig):
        self.setup(cfg, cfg.train.mixed_precision)
        ae = cfg.model.autoencoder
        if ae is not None and "path" not in ae.options:
            raise LimnerError(f"[model] autoencoder {ae.name!r} has no trained weights (path), and an untrained "
                              "one's latents carry no picture: give a trained one, e.g. autoencoder = { name = "
                              "\"autoencoder_kl\", path = \"RUN/autoencoder\" } after `limner train` of an "
                              "autoencoder config (configs/latent/shapes-autoencoder.toml)")
        self.model = TextToImage(cfg.model)
        if ae is not None:  # checkpoints hold the autoencoder's weights and shape, never a path outside them
            cfg.model.autoencoder = ComponentConfig("autoencoders", ae.name, dict(self.model.autoencoder.options))
        self.ema = EMA(self.model, cfg.train.ema)
        if cfg.train.compile:  # in place: parameter names, checkpoints and the EMA copy stay as they are
            self.model.denoiser.compile()
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.ema.model.to(memory_format=torch.channels_last)
        kernel_convs(self.model)  # float32 3x3 ones by Winograd, forward and gradients: cpu-kernel-measurements.md
        self.trained = trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = adamw(trained, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.opts = {"model": self.opt}
        self.setup_data(cfg.model.channels, cfg.model.image_size)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "ema": self.ema.model}

    def _randomness(self, images: torch.Tensor, captions: list[str]):
        """Caption dropout, sigmas and noise of this step and rank, from their own seed."""
        gen = step_generator(self.cfg.seed, self.step, self.acc.process_index)
        keep = torch.rand(len(captions), generator=gen) >= self.cfg.data.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        sigma = training_sigmas(len(captions), self.cfg.train.p_mean, self.cfg.train.p_std, gen)
        noise = torch.randn((len(images), *self.model.latent), generator=gen)
        return captions, sigma.to(self.acc.device), noise.to(self.acc.device)

    def before_fit(self) -> None:
        step = TrainStep(self.model, self.cfg.train.text_noise)
        self.step_module, self.prepared_opt = self.acc.prepare(step, self.opt)
        self.ema.model.to(self.acc.device)

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        """EDM denoising loss on the batch, one AdamW update, the EMA."""
        cfg = self.cfg.train
        captions, sigma, noise = self._randomness(images, captions)
        for group in self.prepared_opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        images = images.to(self.acc.device)
        if cfg.channels_last:
            images, noise = (t.contiguous(memory_format=torch.channels_last) for t in (images, noise))
        loss = self.step_module(images, captions, sigma, noise)
        self.prepared_opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        value = loss.item()
        if not self.guarded_step(self.prepared_opt, self.trained, value, cfg.grad_clip):
            return None
        self.ema.update(self.model, self.step)
        return {"loss": value}

    def summary(self, rows: list[dict[str, float]]) -> dict[str, Any]:
        losses = [r["loss"] for r in rows]
        return {"loss": sum(losses) / len(losses) if losses else None, "lr": lr_at(self.step - 1, self.cfg.train)}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": "skipped" if row["loss"] is None else f"{row['loss']:.4f}"}

    def pipeline(self) -> Pipeline:
        """The EMA model as a pipeline with the run's sampling defaults."""
        # never compiled here: inductor's freezing would keep the weights of the first grid
        return Pipeline(self.ema.model, dataclasses.replace(self.cfg.sample, compile=False), self.acc.device)


# --- the pipeline ------------------------------------------------------------------------


@dataclass
class Plan:
    """What `generate` draws with: the given settings over the checkpoint's defaults, checked."""

    sampler: Any  # the sampler function, options bound
    sigmas: torch.Tensor
    guidance: float

    @property
    def mode(self) -> str:
        return guidance_mode(self.sampler)


class Pipeline(PipelineBase):
    """Text encoder + EMA denoiser of one checkpoint, with its default sampling settings."""

    features = frozenset({"samplers", "compile", "init_image", "dtype"})

    def __init__(self, model: TextToImage, defaults: SampleConfig, device: torch.device):
        super().__init__(model, defaults, device)
        self.memory_format = torch.channels_last if defaults.channels_last else torch.contiguous_format
        self.model.denoiser.to(memory_format=self.memory_format)
        # the decoder's convolutions too (Winograd takes channels-last inputs: an SD 1.5 decode in float32
        # went from 8.3 to 4.3 s, timed by hand; sd15-speed.md has the whole image). Not the
        # encoder's: torch's channels-last GroupNorm differs with the batch size where a group is
        # constant (an inpainting model's blank image: 0.28 apart), its contiguous one does not
        decoder = getattr(self.model.autoencoder, "decoder", None)
        if isinstance(decoder, nn.Module):
            decoder.to(memory_format=self.memory_format)
        self.compiled = False
        self.dtype = precision(defaults.dtype, device)  # refused now where the hardware lacks it
        self.held = torch.float32  # the dtype of the denoiser's linear and convolution weights (hold)
        if defaults.compile:
            self.compile()

    def hold(self, dtype: str) -> None:
        """Keep the denoiser's linear and convolution weights in `dtype` from now on and draw in it
        by default: bfloat16 skips autocast's cast of every weight at every step (same images; an
        SD 1.5-size forward 3.34x float32's instead of 2.43x with autocast alone, with the packed
        convolutions: benchmarks/results/bf16-cpu.md) and halves their memory (safetensors are
        read into memory of their own, limner.checkpoint.SafetensorsFile, so the float32 copies go);
        float32 drawing is refused afterwards (the weights' low bits are gone). A compiled
        pipeline (`[sample] compile`) keeps its weights and draws in `dtype` by autocast: its
        frozen graph folds those casts itself."""
        compute = self.drawn_in(dtype)
        if compute is not self.held and not self.compiled:
            hold_weights(self.model.denoiser, compute)
            self.held = compute
        self.dtype = compute

    def drawn_in(self, dtype: str) -> torch.dtype:
        """The torch dtype `dtype` names, refused where the hardware lacks it (precision) or where
        the weights are already held in another, lower precision."""
        compute = precision(dtype, self.device)
        if compute is not self.held and self.held is not torch.float32:
            raise LimnerError(f"dtype {dtype}: this pipeline holds its denoiser's weights in {str(self.held)[6:]} (it "
                              f"was loaded with dtype {str(self.held)[6:]}); load the checkpoint again without it to "
                              f"draw in {str(compute)[6:]}")
        return compute

    def compile(self) -> None:
        """torch.compile the denoiser in place for sampling (static shapes: one compile per batch
        size). On the CPU, inductor's freezing folds the weights into the graph and pre-packs them
        for oneDNN (the speed-up: benchmarks/results/cpu-amd-epyc-anchors.md);
        the weights must not change afterwards."""
        self.model.denoiser.requires_grad_(False).compile(dynamic=False)
        self.compiled = True

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, *, sampler: str | None = None, schedule: str | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | list[int] = 0, num: int = 1,
                 init_image: Image.Image | None = None, strength: float = 0.6, mask: Image.Image | None = None,
                 progress: bool = False, truncation: float | None = None,
                 sigmas: list[float] | None = None, negative_prompt: str | list[str] | None = None,
                 size: int | None = None, callback=None, dtype: str | None = None) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] for `prompts` (num each); init_image for image-to-image,
        mask (white = redraw) for inpainting; sampler settings default to the checkpoint's;
        `sigmas`, a falling list, replaces schedule and steps; `negative_prompt` (one for all
        prompts or one each) is what guidance steers away from, instead of the empty prompt;
        `size` (pixels, square) other than the model's own, for a latent model; `callback(info)`
        after every step (k-diffusion's dict: i, sigma, x, denoised; an exception it raises stops
        sampling, as `limner serve` cancels a job); `dtype` "bfloat16" (bf16) or "float32" over the
        checkpoint's `[sample] dtype`."""
        compute = self.dtype if dtype is None else self.drawn_in(dtype)
        self.refuse({"truncation": truncation}, "truncation is for GAN and VAE checkpoints; a diffusion model "
                    "trades variety for fidelity with guidance")
        negatives = self.negatives(prompts, negative_prompt, num)
        prompts = self.expand(prompts, num)
        plan = self.plan(sampler, schedule, steps, sigmas, guidance)
        if negative_prompt is not None and plan.guidance == 1 and plan.mode != "cfg_pp":
            raise LimnerError("a negative prompt works through guidance, which is off at scale 1: give --guidance "
                              "above 1 (or drop the negative prompt)")
        size, latent = self.drawn_size(size)
        channels, n = self.model.cfg.channels, len(prompts)
        noise, gen = self.noise(latent, seed, n, num)  # each image its own noise stream
        check_mask_size(init_image, mask)
        check_mask_init(init_image, mask)
        pixels = None if init_image is None else image_tensor(init_image, size, channels, n, self.device)
        init = None if pixels is None else self.model.to_latent(pixels)
        # with an autoencoder, inpainting blends latents: the mask at the latent's size
        redraw = None if mask is None else mask_tensor(mask, latent[1], n, self.device)
        cond = self.model.encode(prompts)
        uncond = self.model.encode(negatives) if plan.guidance != 1 or plan.mode == "cfg_pp" else None
        if getattr(self.model.denoiser, "concat", 0):  # an inpainting model keeps the unmasked part itself
            image = self.inpainting_channels(pixels, mask, n, size).contiguous(memory_format=self.memory_format)
            cond, uncond = (None if c is None else WithImage(c, image) for c in (cond, uncond))
            if mask is not None:  # the masked part is drawn from noise, as with an ordinary model's mask
                init, redraw = None, None
        kept = freed_memory_kept() if self.device.type == "cpu" else contextlib.nullcontext()
        with inference_compile(self.compiled and self.device.type == "cpu"), autocast(compute, self.device):
            with kept:
                out = sample(self.model, noise.contiguous(memory_format=self.memory_format), sampler=plan.sampler,
                             sigmas=plan.sigmas, guidance=plan.guidance, cond=cond, uncond=uncond, generator=gen,
                             progress=progress, callback=callback, strength=strength, mask=redraw,
                             init=None if init is None else init.contiguous(memory_format=self.memory_format))
            out = self.model.to_image(out.contiguous(memory_format=self.memory_format)).float()
        if not bool(torch.isfinite(out).all()):
            raise LimnerError(f"sampling produced NaN or infinite pixels (sampler {plan.sampler.limner_name}, "
                              f"{len(plan.sigmas) - 1} steps, guidance {plan.guidance:g}): the images would be blank. "
                              "Lower the guidance, use more steps or another sampler; nothing was written.")
        return out.clamp(-1, 1)

    def negatives(self, prompts: list[str] | str, negative: str | list[str] | None, num: int) -> list[str]:
        """The prompts guidance steers away from, one per image: "" (none) by default."""
        n = 1 if isinstance(prompts, str) else len(prompts)
        if negative is None:
            negative = [""] * n
        elif isinstance(negative, str):
            negative = [negative] * n
        elif not isinstance(negative, (list, tuple)) or not all(isinstance(p, str) for p in negative) or \
                len(negative) != n:
            raise LimnerError(f"negative_prompt must be one text or one per prompt ({n}), got {negative!r:.80}")
        return self.expand(list(negative), num)

    def drawn_size(self, size: int | None) -> tuple[int, tuple[int, ...]]:
        """(pixels, the latent's [C, H, W]) of the images drawn: the model's own size, or `size`
        for a latent model (its UNet takes any multiple of the autoencoder's factor)."""
        if size is None or size == self.model.cfg.image_size:
            return self.model.cfg.image_size, self.model.latent
        if self.model.autoencoder is None:
            raise LimnerError(f"size {size}: this model draws at the size it was trained at, "
                              f"{self.model.cfg.image_size}; latent models (with an autoencoder) draw at others")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= 4096:
            raise LimnerError(f"size must be a whole number of pixels in 1..4096, got {size!r}")
        return size, self.model.autoencoder.latent_shape(self.model.cfg.channels, size)

    def inpainting_channels(self, pixels: torch.Tensor | None, mask: Image.Image | None, n: int,
                            size: int | None = None) -> torch.Tensor:
        """What an inpainting model (Stable Diffusion's 9-channel UNets) reads beside its latent,
        as diffusers' StableDiffusionInpaintPipeline makes it: the mask (1 = redraw) at the
        latent's size (nearest, the top-left pixel of each cell), then the latents of the image
        with the masked part set to 0 (mid-grey). No init image: everything is redrawn (mask 1,
        image 0, as A1111 feeds an inpainting model for text-to-image); no mask: likewise, over
        the init image's noised latents (image-to-image)."""
        size, (c, h, w) = self.drawn_size(size)
        concat, channels = self.model.denoiser.concat, self.model.cfg.channels
        if concat != c + 1:
            raise LimnerError(f"this denoiser reads {concat} image channels beside its {c}-channel latent; limner "
                              f"feeds inpainting models' {c + 1} (the mask and the masked image's latents)")
        redraw = torch.ones(n, 1, size, size, device=self.device) if mask is None else mask_tensor(
            mask, size, n, self.device)
        kept = torch.zeros(n, channels, size, size, device=self.device) if pixels is None else pixels * (redraw < 0.5)
        small = F.interpolate(redraw, size=(h, w), mode="nearest")
        return torch.cat([small, self.model.to_latent(kept)], 1)

    def plan(self, sampler: str | None = None, schedule: str | None = None, steps: int | None = None,
             sigmas: list[float] | None = None, guidance: float | None = None) -> Plan:
        """The sampler (options bound), sigmas and guidance scale `generate` uses: the given
        settings over the checkpoint's defaults, each checked."""
        d = self.defaults
        for what, given in (("sampler", sampler), ("schedule", schedule)):
            if given is not None and not str(given).strip():
                raise LimnerError(f"the {what} name is empty: give one (see `limner plugins`), or leave it out for "
                                  f"the checkpoint's {getattr(d, what).name!r}")
        if sampler:
            sampler, implied = split_sampler_name(sampler)  # "DPM++ 2M Karras" = dpmpp_2m + karras
            if implied and schedule and schedule != implied:
                raise LimnerError(f"the sampler name says schedule {implied!r} but --schedule says {schedule!r}: "
                                  "give one of them")
            schedule = schedule or implied
        sampler_cfg = ComponentConfig("samplers", sampler) if sampler else d.sampler
        schedule_cfg = ComponentConfig("schedules", schedule) if schedule else d.schedule
        if sigmas is not None:
            if schedule or steps:
                raise LimnerError("sigmas are the whole schedule: give them, or a schedule and steps, not both")
            sigmas = explicit_sigmas(sigmas, self.device)
        else:
            sigmas = make_sigmas(schedule_cfg.name, steps or d.steps, d.sigma_min, d.sigma_max, device=self.device,
                                 **schedule_cfg.options)
        return Plan(resolve_sampler(sampler_cfg.name, **sampler_cfg.options), sigmas,
                    d.guidance if guidance is None else guidance)

    def check(self, **options) -> None:
        self.plan(**options)

    def kept_psnr(self, images: torch.Tensor, init_image: Image.Image, mask: Image.Image | None = None) -> float:
        """PSNR (dB) of `images` against the init image where it was to be kept (limner.pipeline.kept_psnr)."""
        size, channels, n = images.shape[-1], self.model.cfg.channels, len(images)
        init = image_tensor(init_image, size, channels, n, torch.device("cpu"))
        redraw = None if mask is None else mask_tensor(mask, size, n, torch.device("cpu"))
        return kept_psnr(images.cpu(), init, redraw)


def diffusion() -> Recipe:
    """Text-to-image diffusion: a denoiser trained with the EDM loss, sampled by any sampler."""
    return Recipe(config=TrainConfig, trainer=Trainer, model=lambda cfg: TextToImage(cfg.model), pipeline=Pipeline)
