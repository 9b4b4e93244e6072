"""Pipelines: a trained model as a callable that draws PIL images (`limner.load_pipeline(dir)`,
in recipes.py, builds a checkpoint's through its recipe). `PipelineBase` is what every recipe's
pipeline shares, with the init-image and mask helpers image-to-image and inpainting use; each
recipe's pipeline lives in its plugin module (the diffusion one in limner.plugins.diffusion_recipe).

    pipe = limner.load_pipeline("runs/shapes")
    images = pipe(["a red circle at the top left"], sampler="dpmpp_2m", schedule="karras",
                  steps=20, guidance=3.0, seed=0)
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import re
import threading
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

from .config import check_memory
from .errors import LimnerError
from .images import to_pil
from .sampling import item_generators, randn_like


class PipelineBase:
    """What every recipe's pipeline shares: the model in eval mode on its device and its default
    sampling settings, `pipe(prompts, **options)` -> PIL images, `num` images per prompt, one
    seeded noise stream per image, and a clear refusal of options its kind of model does not take.
    A recipe's pipeline subclasses it and writes `generate(prompts, *, seed, num, progress, ...)`
    -> [N, C, H, W] in [-1, 1]."""

    # What this pipeline offers beyond drawing, declared (callers ask `"compile" in pipe.features`,
    # never hasattr): "samplers" (sampler, schedule, steps, sigmas, guidance), "compile"
    # (torch.compile for sampling), "init_image" (image-to-image, inpainting, kept_psnr), "dtype"
    # (hold(dtype): weights kept in bfloat16), "truncation", "reconstruct" (encode + decode held-out images).
    features: frozenset[str] = frozenset()

    def __init__(self, model: torch.nn.Module, defaults, device: torch.device):
        self.model, self.defaults, self.device = model.eval().to(device), defaults, device
        kernel_convs(self.model)  # limner's kernels for its convolutions where they fit

    def load_lora(self, path: str | Path, strength: float = 1.0, merge: bool = True):
        """Apply a LoRA file (limner.lora: kohya/A1111 or diffusers/PEFT layout) to the model:
        merged into the weights, or kept beside them (merge=False) so that its `set_strength`
        changes it without reloading (cached text embeddings are forgotten on every change).
        Returns the limner.lora.Applied."""
        from .lora import Applied

        if getattr(self, "compiled", False):
            raise LimnerError(f"load {path} before compiling: the compiled model holds its weights as they were")
        if getattr(self, "held", torch.float32) is not torch.float32:
            raise LimnerError(f"load {path} before choosing the dtype: its change would be rounded into weights "
                              "already held in a lower precision")
        applied = Applied(self.model, path, strength, merge, on_change=self.changed)
        self.loras = [*getattr(self, "loras", []), applied]
        self.changed()
        return applied

    def changed(self) -> None:
        """Forget cached text embeddings: the model changed in a way its weights may not show."""
        for module in self.model.modules():
            cache = getattr(module, "text_cache", None)
            if hasattr(cache, "clear"):
                cache.clear()

    def __call__(self, prompts: list[str] | str, **options) -> list[Image.Image]:
        """Images for `prompts`: see `generate` for the options. Same arguments, same images."""
        return to_pil(self.generate(prompts, **options))

    def generate(self, prompts: list[str] | str, **options) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define generate()")

    def check(self, **options) -> None:
        """Raise on settings `generate` would refuse (the defaults, or `options`), without
        drawing: a trainer calls it before its first step, not at its first sample grid."""

    @staticmethod
    def expand(prompts: list[str] | str, num: int) -> list[str]:
        """Each prompt `num` times in a row (image j of prompt k is item k * num + j)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise LimnerError(f"num (images per prompt) must be a whole number >= 1, got {num!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [p for p in prompts for _ in range(num)]

    def noise(self, shape: tuple[int, ...], seed: int | list[int], items: int,
              num: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """[items, *shape] standard normal noise, each item from its own generator (seeded by
        item_generators: a prompt draws the same images alone or in any batch), and the generators."""
        check_memory(items * math.prod(shape) * 4 * 4, f"drawing {items} images of {'x'.join(map(str, shape))}",
                     "draw fewer images at a time (--num, prompts)")
        gen = item_generators(seed, items, num, self.device)
        return randn_like(torch.empty((items, *shape), device=self.device), gen), gen

    @staticmethod
    def refuse(options: dict, why: str) -> None:
        """An error naming the options given (not None) that this pipeline does not take, and why."""
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise LimnerError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply here: {why}")


def image_tensor(image: Image.Image, size: int, channels: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, channels, size, size] in [-1, 1]: an init image at a model's size. A non-square image
    is centre-cropped to a square first (never squashed), then resized."""
    image = _centre_square(image.convert("RGB" if channels == 3 else "L")).resize((size, size),
                                                                              Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr[None].expand(n, -1, -1, -1).to(device)


def mask_tensor(mask: Image.Image, size: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, 1, size, size] of 0/1 (1 = redraw): a mask cropped exactly as its init image is, then resized."""
    mask = _centre_square(mask.convert("L")).resize((size, size), Image.Resampling.NEAREST)
    arr = np.asarray(mask, dtype=np.float32) / 255
    return torch.from_numpy(arr > 0.5).float()[None, None].expand(n, 1, -1, -1).to(device)


def check_mask_size(init_image: Image.Image | None, mask: Image.Image | None) -> None:
    """A mask must have its init image's size (both are cropped and resized alike)."""
    if init_image is not None and mask is not None and mask.size != init_image.size:
        raise LimnerError(f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is "
                          f"{init_image.size[0]}x{init_image.size[1]}: give a mask of the image's size "
                          "(white = redraw)")


def kept_psnr(images: torch.Tensor, init: torch.Tensor, redraw: torch.Tensor | None = None) -> float:
    """PSNR (dB, pixel range [0, 1]) of `images` against `init` where it was to be kept: outside
    the `redraw` mask for inpainting, everywhere for image-to-image (there it says how far the
    redraw moved). inf where the kept pixels are exactly the init image's."""
    keep = torch.ones_like(init[:, :1]) if redraw is None else 1 - redraw
    keep = keep.expand_as(init)
    if not bool(keep.any()):
        raise LimnerError("the mask redraws every pixel: no region is kept to compare")
    mse = float((((images - init) / 2) ** 2 * keep).sum() / keep.sum())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def _centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of `image` (an init image and its mask are cut alike)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


PRECISIONS = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX's amx_bf16): elsewhere
    oneDNN emulates it, slower than float32."""
    # imported here, not at the top: importing limner.kernels before the rest of this module made
    # freed_memory_kept's test see kept 64 MB blocks fault again (the likely reason: its docstring)
    from limner.kernels import cpuinfo

    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo()))


def precision(name: str, device: torch.device) -> torch.dtype:
    """The dtype a pipeline's denoiser and decoder compute in ("float32", "bfloat16"; fp32 and
    bf16 too), refused where the hardware has no fast bfloat16."""
    if name not in PRECISIONS:
        raise LimnerError(f"dtype {name!r}: limner samples in float32 (fp32) or bfloat16 (bf16)")
    dtype = PRECISIONS[name]
    if dtype is torch.bfloat16 and device.type == "cpu" and not native_bf16():
        raise LimnerError("dtype bfloat16 needs a CPU with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo); "
                          "this one has neither, and emulated bf16 runs slower than float32: use float32")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LimnerError("dtype bfloat16: this GPU does not support bfloat16; use float32")
    return dtype


def autocast(dtype: torch.dtype, device: torch.device):
    """bfloat16 autocast for the block (matmuls, convolutions, attention in bf16; PyTorch's norm
    and softmax kernels accumulate in float32; tensors made outside, the sampler's state among
    them, stay float32); nothing for float32."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


HELD = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)


def hold_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights and biases of `module`'s linear and convolution layers to `dtype`, once:
    under bf16 autocast those are what it casts on every call (on an SD 1.5-size UNet at a 64x64
    latent that cast is ~23% of a forward: benchmarks/results/bf16-cpu.md) and they are most of
    its memory; norms, embeddings and other parameters keep float32. Autocast rounds to nearest
    even as .to() does, so the outputs are the same bits as autocast's. Its convolutions become
    limner.nn.KernelConv2d (kernel_convs): a bf16 weight is packed for oneDNN once, not at
    every call (same outputs)."""
    for layer in module.modules():
        if isinstance(layer, HELD):
            for p in layer.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
    kernel_convs(module)


def kernel_convs(module: torch.nn.Module) -> None:
    """Turn `module`'s plain nn.Conv2d layers into limner.nn.KernelConv2d, in place (same
    parameters, state dict, hooks): on the CPU a bf16 weight is then packed once and a float32 3x3
    convolution runs by Winograd (limner.kernels.conv2d; an SD 1.5-size UNet's float32 forward 1.30x,
    benchmarks/results/cpu-kernel-measurements.md), in training its forward and input gradient too."""
    from .nn import KernelConv2d

    for layer in module.modules():
        if type(layer) is torch.nn.Conv2d:
            KernelConv2d.from_conv(layer)


MALLOC_CHOICES = ("keep", "default")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
GLIBC_MMAP_MAX = 65536  # its default count of mappings
# where glibc's dynamic thresholds end up once big blocks have been freed (malloc.c:
# DEFAULT_MMAP_THRESHOLD_MAX, 32 MB on 64-bit; the trim threshold twice the mmap one)
MMAP_THRESHOLD_MAX = 32 << 20
_malloc = {"libc": None, "depth": 0, "lock": threading.Lock()}


def _glibc():
    """The C library when it is glibc (mallopt's parameters are glibc's), else None."""
    if _malloc["libc"] is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
            _malloc["libc"] = libc
        except (OSError, AttributeError, TypeError):
            _malloc["libc"] = False
    return _malloc["libc"] or None


@contextlib.contextmanager
def freed_memory_kept():
    """Inside the block glibc's malloc keeps large freed blocks for the next tensor instead of
    handing them back to the system. By default every block over 32 MB is a mapping of its own,
    unmapped when freed, so the next tensor of that size faults all its pages in again, each one
    zeroed by the kernel: an SD 1.5-size UNet frees and allocates dozens of those per step (~7%
    of a bf16 forward, ~10% of a float32 one: benchmarks/results/cpu-kernel-measurements.md). M_MMAP_MAX 0
    takes every block from the heap, as jemalloc and tcmalloc, which Intel recommends for PyTorch
    on CPUs, keep theirs. Kept for the whole process, the heap fragments (a float32 SD image
    peaked 0.7 GB higher), so on leaving the block the free heap is handed back (malloc_trim) and
    glibc's thresholds are set where its own dynamic policy ends up for big tensors: blocks over
    32 MB mapped, up to 64 MB of freed heap top kept. Not its start values: any mallopt of them
    turns glibc's dynamic adjustment off for the rest of the process, and with the start values
    (128 KB) it would trim the heap at nearly every free: after a first block the demo's training
    step faulted ~18,700 pages a step in again (by hand), ~7,000 in a fresh process and ~1,300
    after a block with these (benchmarks/results/malloc-train-*.md). Blocks may nest and run in
    several threads at once (`limner serve`): the first in sets, the last out restores.
    LIMNER_MALLOC=default leaves malloc alone; elsewhere than glibc nothing changes.

    Not every freed block is reused. The likely reason (glibc's memalign; not traced inside
    malloc): torch asks for 64-byte aligned memory, which glibc serves by over-allocating 64 + 32
    bytes; a freed block that could not merge into the heap's top (a small allocation, such as
    a tensor's own C++ objects, landed above it) is too small for the next request of its own
    size, and the heap grows instead. Seen with strace in the test's loop of 64 MB tensors: with
    the `limner.kernels` extension imported first, two of four grew the heap (faulting their
    pages again) where none did otherwise; it depends on what the process allocated before."""
    choice = os.environ.get("LIMNER_MALLOC", "keep").strip().lower() or "keep"
    if choice not in MALLOC_CHOICES:
        raise LimnerError(f"LIMNER_MALLOC={choice!r}: valid are keep (large freed blocks reused while sampling, the "
                          "default) and default (glibc's own policy)")
    libc = _glibc() if choice == "keep" else None
    if libc is None:
        yield False
        return
    with _malloc["lock"]:
        if _malloc["depth"] == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        _malloc["depth"] += 1
    try:
        yield True
    finally:
        with _malloc["lock"]:
            _malloc["depth"] -= 1
            if _malloc["depth"] == 0:
                libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
                libc.malloc_trim(0)


def inference_compile(freeze: bool):
    """Inductor's freezing for the compiles this block triggers (the first call at each shape)."""
    if not freeze:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


MAX_IMAGE_PIXELS = 64 * 2**20  # an init image or mask larger than 64 megapixels is refused, not decoded


def open_image(path: str | Path | IO[bytes] | None, name: str | None = None) -> Image.Image | None:
    """Open an image file (or the bytes of one, called `name` in errors), naming it if it is
    missing, unreadable or too large to decode (a decompression bomb); 16-bit and float images
    are scaled to 8 bits, never clipped. None passes through."""
    if path is None:
        return None
    name = name or str(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise LimnerError(f"image {name} is {im.width}x{im.height} pixels; init images and masks may have at "
                                  f"most {MAX_IMAGE_PIXELS // 2**20} megapixels (they are resized to the model's size)")
            im.load()
            return _eight_bit(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LimnerError(f"cannot read image {name}: {exc}") from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """An image of more than 8 bits a channel (PNG's I;16, TIFF's I or F) scaled to its full range
    in 8 bits: PIL's convert("L"/"RGB") would clip every value above 255."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return image
    arr = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
    if image.mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1 else top
    return Image.fromarray(np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8), mode="L")
