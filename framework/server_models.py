"""The request bodies of `limner serve` (pydantic models: FastAPI checks them and writes them into
the OpenAPI schema): limner's own POST /v1/images, and A1111's txt2img and img2img with the field
names, defaults and meanings of AUTOMATIC1111's stable-diffusion-webui API (modules/api/models.py
there). Fields A1111 has and limner cannot honour are accepted at A1111's neutral value and
refused, by name, at any other: an image is never silently drawn other than asked."""
from __future__ import annotations

import re
from typing import Any, ClassVar

from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .serve import Engine, Request, RequestError, decode_image


class ImagesBody(BaseModel):
    """POST /v1/images. Sampler settings left out are the model's own defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] = Field(description="The text of the picture, or a list of them.")
    negative_prompt: str | None = Field(None, description="What guidance steers away from.")
    model: str | None = Field(None, description="A name from GET /v1/models (default: the first).")
    sampler: str | None = Field(None, description="A name from GET /v1/samplers; A1111's 'DPM++ 2M Karras' too.")
    schedule: str | None = Field(None, description="A name from GET /v1/schedules.")
    steps: int | None = None
    guidance: float | None = Field(None, description="Classifier-free guidance scale.")
    seed: int | None = Field(None, description="Image j of each prompt uses seed + j; left out (or -1): random.")
    count: int = Field(1, description="Images per prompt.")
    size: int | None = Field(None, description="Pixels, square (latent models draw at several sizes).")
    strength: float | None = Field(None, description="Image-to-image: how much of init_image is redrawn, (0, 1].")
    truncation: float | None = Field(None, description="GAN and VAE models: in [0, 1].")
    dtype: str | None = Field(None, description="float32 or bfloat16 (bf16), where the server's CPU has native bf16.")
    init_image: str | None = Field(None, description="Base64 PNG or JPEG: image-to-image or inpainting.")
    mask: str | None = Field(None, description="Base64 image, white = redraw (needs init_image).")


def _model_name(engine: Engine, name: Any) -> str | None:
    """A1111's checkpoint title ("name.safetensors [hash]") to a served model's name."""
    if name is None or name in engine.paths:
        return name
    bare = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(name))
    stem = re.sub(r"\.(safetensors|ckpt|pt|bin|gguf)$", "", bare)
    return next((n for n in (bare, stem) if n in engine.paths), name)


class A1111Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img, as A1111 names it. Left out: the model's defaults for sampler,
    steps, guidance and size (A1111's own are 50 steps, scale 7, 512x512)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str | None = None
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None

    HONOURED: ClassVar[str] = ("prompt, negative_prompt, seed, sampler_name (or sampler_index), scheduler, steps, "
                               "cfg_scale, width = height, batch_size, n_iter, override_settings.sd_model_checkpoint")

    def unsupported(self) -> list[str]:
        """The fields set to something limner would not draw."""
        bad = []
        checks = [
            ("styles", not self.styles), ("subseed_strength", not self.subseed_strength),
            ("seed_resize_from_h", self.seed_resize_from_h in (-1, 0)),
            ("seed_resize_from_w", self.seed_resize_from_w in (-1, 0)),
            ("restore_faces", not self.restore_faces), ("tiling", not self.tiling),
            ("eta", self.eta in (None, 0)), ("s_min_uncond", self.s_min_uncond in (None, 0)),
            ("s_churn", self.s_churn in (None, 0)), ("s_tmin", self.s_tmin in (None, 0)),
            ("s_tmax", self.s_tmax in (None, 0)), ("s_noise", self.s_noise in (None, 0, 1)),
            ("refiner_checkpoint", not self.refiner_checkpoint), ("firstpass_image", not self.firstpass_image),
            ("enable_hr (hires. fix)", not self.enable_hr), ("script_name", not self.script_name),
            ("script_args", not self.script_args), ("alwayson_scripts", not self.alwayson_scripts),
        ]
        bad += [name for name, ok in checks if not ok]
        other = sorted(set(self.override_settings or {}) - {"sd_model_checkpoint"})
        bad += [f"override_settings.{k}" for k in other]
        return bad

    def common(self, engine: Engine) -> dict[str, Any]:
        """The Request fields both A1111 endpoints share."""
        bad = self.unsupported()
        if bad:
            raise RequestError(f"limner cannot honour {', '.join(bad)} as given (send them at A1111's defaults or "
                               f"leave them out); of A1111's fields it honours {self.HONOURED}")
        if (self.width is None) != (self.height is None) or (self.width is not None and self.width != self.height):
            raise RequestError(f"width {self.width} and height {self.height}: limner draws square images; give "
                               "both equal, or neither for the model's own size")
        for what, value in (("batch_size", self.batch_size), ("n_iter", self.n_iter)):
            if value < 1:
                raise RequestError(f"{what} must be 1 or more, got {value}")
        scheduler = None if self.scheduler in (None, "", "Automatic", "automatic") else self.scheduler
        model = _model_name(engine, (self.override_settings or {}).get("sd_model_checkpoint"))
        return dict(prompts=[self.prompt], negative_prompt=self.negative_prompt or None, model=model,
                    sampler=self.sampler_name or self.sampler_index or None, schedule=scheduler, steps=self.steps,
                    guidance=self.cfg_scale, seed=None if self.seed == -1 else self.seed,
                    count=self.batch_size * self.n_iter, size=self.width)

    def to_request(self, engine: Engine) -> Request:
        return Request(**self.common(engine))


class A1111Img2Img(A1111Txt2Img):
    """POST /sdapi/v1/img2img: one init image, and a mask for inpainting (white = redraw;
    inpainting_mask_invert = 1 flips it). Without a mask, denoising_strength (A1111's default
    0.75) is how much is redrawn; with one, the masked part is redrawn from pure noise, as A1111
    does at denoising_strength 1 with 'latent noise' fill."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False

    HONOURED: ClassVar[str] = (A1111Txt2Img.HONOURED
                               + ", init_images (one), mask, inpainting_mask_invert, denoising_strength")

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        checks = [("image_cfg_scale", self.image_cfg_scale is None),
                  ("initial_noise_multiplier", self.initial_noise_multiplier in (None, 1)),
                  ("latent_mask", not self.latent_mask), ("include_init_images", not self.include_init_images),
                  ("resize_mode (limner centre-crops to a square: 0 or 1)", self.resize_mode in (0, 1))]
        if self.mask is not None:
            checks += [("mask_blur", self.mask_blur in (None, 0, 4) and {self.mask_blur_x, self.mask_blur_y} <= {0, 4}),
                       ("inpainting_fill (limner redraws from noise: 0 or 2)", self.inpainting_fill in (0, 2)),
                       ("denoising_strength below 1 with a mask (limner redraws the masked part from pure noise)",
                        self.denoising_strength in (None, 1))]
        return bad + [name for name, ok in checks if not ok]

    def to_request(self, engine: Engine) -> Request:
        fields = self.common(engine)
        if not self.init_images:
            raise RequestError("img2img needs init_images: a list with one base64-encoded image")
        if len(self.init_images) > 1:
            raise RequestError(f"{len(self.init_images)} init_images: limner's img2img takes one")
        init = decode_image(self.init_images[0], "init_images[0]")
        mask = decode_image(self.mask, "mask")
        if mask is not None and self.inpainting_mask_invert:
            mask = ImageOps.invert(mask.convert("L"))
        strength = None if mask is not None else (0.75 if self.denoising_strength is None else self.denoising_strength)
        return Request(**fields, init_image=init, mask=mask, strength=strength)
