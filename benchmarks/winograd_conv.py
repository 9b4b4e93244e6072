"""oneDNN's direct convolution against limner.kernels.conv2d (Winograd where it fits and is
faster, kernels/cpu_winograd.py) at the 3x3 convolution shapes of Stable Diffusion 1.5's UNet
(64x64 latent, batch 2, guided), its VAE decoder (one 512x512 image) and the demo UNet
(configs/shapes-unet.toml, batch 2), channels-last, no grad, inside limner.pipeline.
freed_memory_kept as sampling runs them; each side called in turn. The count is how many such
convolutions one forward (one decode) runs, so each group's last line is its convolution time.
float32: F.conv2d against conv2d; bf16 (--dtype bf16): oneDNN's convolution on a weight packed
once (conv2d_packed, what a bf16-held model ran before) against conv2d with a Packed holder (the
Winograd transform kept, as a held model keeps it; its first call, which makes it, not timed).

    python benchmarks/winograd_conv.py [--dtype bf16]   # prints the markdown table (cpu-kernel-measurements.md)
    python benchmarks/winograd_conv.py --sd FILE [--dtype bf16]  # and a whole UNet forward, Winograd on and off
    python benchmarks/winograd_conv.py --train   # the demo UNet's convolutions in training, forward + backward
    python benchmarks/winograd_conv.py --weight-grad   # the weight's gradient alone: oneDNN, F(2,3), F(4,3)

--train times each of the demo UNet's 3x3 convolution shapes at its training batch (16) forward
and backward (the input's, weight's and bias's gradients), F.conv2d against conv2d with autograd
(WinogradConv2d: the forward, the input's gradient and with 32+ channels the weight's by Winograd),
and then the demo UNet's whole training step (benchmarks/anchors.py's, as `limner train` runs it)
with Winograd in training and without (oneDNN's convolutions; its other kernels alike), in turn.

--sd FILE (an SD 1.5-size checkpoint, e.g. from benchmarks/sd_full_size.py) adds the UNet forward
(batch 2, 64x64 latent) with Winograd and without (limner's other kernels alike), in turn, and
how far the two outputs are apart.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from in_turn import in_turn, medians

from limner.bench import cpu_name
from limner.kernels import Packed, conv2d, conv2d_packed, cpu_winograd
from limner.kernels.cpu_winograd import faster, fits, tile, weight_grad_tile
from limner.pipeline import freed_memory_kept

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# group -> [(batch, in channels, out channels, pixels per side, how many per forward or decode)]
SHAPES = {
    "SD 1.5 UNet, 64x64 latent": [
        (2, 320, 320, 64, 8), (2, 640, 640, 32, 7), (2, 1280, 1280, 16, 8), (2, 1280, 1280, 8, 11),
        (2, 2560, 1280, 16, 2), (2, 2560, 1280, 8, 3), (2, 1920, 1280, 16, 1), (2, 1920, 640, 32, 1),
        (2, 960, 320, 64, 1), (2, 640, 320, 64, 2), (2, 1280, 640, 32, 1), (2, 1280, 1280, 32, 1),
        (2, 640, 640, 64, 1), (2, 320, 640, 32, 1), (2, 640, 1280, 16, 1), (2, 960, 640, 32, 1),
        (2, 4, 320, 64, 1), (2, 320, 4, 64, 1)],
    "SD 1.5 VAE decoder, 512x512": [
        (1, 4, 512, 64, 1), (1, 512, 512, 64, 10), (1, 512, 512, 128, 7), (1, 512, 512, 256, 1),
        (1, 512, 256, 256, 1), (1, 256, 256, 256, 5), (1, 256, 256, 512, 1), (1, 256, 128, 512, 1),
        (1, 128, 128, 512, 5), (1, 128, 3, 512, 1)],
    "demo UNet (shapes-unet), 32x32": [
        (2, 3, 32, 32, 1), (2, 32, 32, 32, 4), (2, 64, 64, 16, 4), (2, 64, 64, 8, 6), (2, 128, 64, 16, 2),
        (2, 96, 32, 32, 1), (2, 64, 32, 32, 2), (2, 32, 3, 32, 1)],
}


def main(dtype: torch.dtype, runs: int = 7) -> None:
    torch.manual_seed(0)
    bf16 = dtype is torch.bfloat16
    direct = "conv2d_packed" if bf16 else "F.conv2d"
    lines = [f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/winograd_conv.py{' --dtype bf16' if bf16 else ''}`; "
             f"{str(dtype)[6:]}, medians of {runs} calls a side, alternated (F(m,3) blank where the shape stays on "
             f"{direct}):", "",
             f"| shape: batch, in -> out, pixels | per pass | {direct} ms | limner ms | F(m,3) | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    with torch.no_grad(), freed_memory_kept():
        for group, shapes in SHAPES.items():
            lines.append(f"| *{group}* | | | | | |")
            total = {"direct": 0.0, "limner": 0.0}
            for n, cin, cout, size, count in shapes:
                x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last).to(dtype)
                w = (torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5).to(dtype)
                b = torch.randn(cout).to(dtype)
                if bf16:  # each with its own holder: oneDNN's packing, Winograd's transform (where taken)
                    sides = {"direct": partial(conv2d_packed, x, w, b, 1, 1, 1, 1, Packed()),
                             "limner": partial(conv2d, x, w, b, 1, 1, 1, 1, packed=Packed())}
                else:
                    sides = {"direct": partial(F.conv2d, x, w, b, 1, 1),
                             "limner": partial(conv2d, x, w, b, 1, 1, 1, 1)}
                med = {name: seconds * 1e3 for name, seconds in medians(in_turn(sides, runs)).items()}
                for name in total:
                    total[name] += med[name] * count
                m = tile(x) if fits(x, w, b) and faster(x, w) else None
                lines.append(f"| {n}, {cin} -> {cout}, {size}x{size} | {count} | {med['direct']:.2f} | "
                             f"{med['limner']:.2f} | {m or ''} | {med['direct'] / med['limner']:.2f}x |")
            digits = 0 if total["direct"] >= 100 else 2
            lines.append(f"| **{group}: its 3x3 convolutions** | | {total['direct']:.{digits}f} | "
                         f"{total['limner']:.{digits}f} | | "
                         f"**{total['direct'] / total['limner']:.2f}x** |")
    print("\n".join(lines))


def backward(conv, inputs: tuple, grad: torch.Tensor) -> None:
    torch.autograd.grad(conv(), inputs, grad)


def training(runs: int = 15) -> None:
    """The demo UNet's 3x3 convolutions at its training batch, forward + backward, in turn."""
    torch.manual_seed(0)
    lines = [f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/winograd_conv.py --train`; float32, forward + "
             f"backward (input, weight and bias gradients), medians of {runs} calls a side, alternated:", "",
             "| shape: batch, in -> out, pixels | per step | F.conv2d ms | limner ms | F(m,3) | weight's F(m,3) "
             "| speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    total = {"direct": 0.0, "limner": 0.0}
    for _, cin, cout, size, count in SHAPES["demo UNet (shapes-unet), 32x32"]:
        x = torch.randn(16, cin, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5).requires_grad_()
        b = torch.randn(cout).requires_grad_()
        grad = torch.randn(16, cout, size, size).contiguous(memory_format=torch.channels_last)
        sides = {"direct": partial(backward, partial(F.conv2d, x, w, b, 1, 1), (x, w, b), grad),
                 "limner": partial(backward, partial(conv2d, x, w, b, 1, 1, 1, 1), (x, w, b), grad)}
        med = {name: seconds * 1e3 for name, seconds in medians(in_turn(sides, runs)).items()}
        for name in total:
            total[name] += med[name] * count
        on = fits(x, w, b, training=True) and faster(x, w)
        m, mw = (tile(x), weight_grad_tile(w)) if on else (None, None)
        lines.append(f"| 16, {cin} -> {cout}, {size}x{size} | {count} | {med['direct']:.2f} | {med['limner']:.2f} | "
                     f"{m or ''} | {mw or ''} | {med['direct'] / med['limner']:.2f}x |")
    lines.append(f"| **demo UNet training step: its 3x3 convolutions** | | {total['direct']:.1f} | "
                 f"{total['limner']:.1f} | | | **{total['direct'] / total['limner']:.2f}x** |")
    print("\n".join(lines))
    from anchors import train_step_with_and_without

    # off: Winograd for no-grad calls only, as before training took it
    med = train_step_with_and_without(cpu_winograd, "fits", partial(_no_training, cpu_winograd.fits), runs)
    print(f"\nThe demo UNet's training step (batch 16, forward + backward + fused AdamW, channels-last), medians of "
          f"{runs} alternated: Winograd in training {med['on'] * 1e3:.1f} ms, without {med['off'] * 1e3:.1f} ms: "
          f"**{med['off'] / med['on']:.2f}x**.")


# weight gradients: (batch, in, out, pixels): the demo UNet's training shapes, fewer channels, SD 1.5's sizes
WEIGHT_GRAD_SHAPES = [(16, 8, 8, 32), (16, 16, 16, 32), (16, 32, 32, 32), (16, 64, 64, 16), (16, 64, 64, 8),
                      (16, 128, 64, 16), (16, 96, 32, 32), (2, 320, 320, 64), (2, 640, 640, 32), (2, 1280, 1280, 16),
                      (2, 1280, 1280, 8)]


def weight_grads(runs: int = 7) -> None:
    """The 3x3 weight's gradient alone: oneDNN's (aten's convolution_backward) against the kernel's
    weight_grad by F(2,3) and F(4,3), in turn: where WEIGHT_GRAD_CHANNELS and WEIGHT_GRAD_F4 come from."""
    from limner.kernels.cpu_winograd import weight_grad

    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"`python benchmarks/winograd_conv.py --weight-grad`; float32, medians of {runs} calls a side, alternated:\n"
          f"\n| shape: batch, in -> out, pixels | oneDNN ms | F(2,3) ms | F(4,3) ms | taken | speed-up |\n"
          f"|---|---:|---:|---:|---:|---:|")
    for n, cin, cout, size in WEIGHT_GRAD_SHAPES:
        x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3)
        grad = torch.randn(n, cout, size, size).contiguous(memory_format=torch.channels_last)
        onednn = partial(torch.ops.aten.convolution_backward, grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                         1, [False, True, False])
        med = {k: v * 1e3 for k, v in medians(in_turn({"onednn": onednn, 2: partial(weight_grad, x, grad, 2),
                                                        4: partial(weight_grad, x, grad, 4)}, runs)).items()}
        m = weight_grad_tile(w)
        print(f"| {n}, {cin} -> {cout}, {size}x{size} | {med['onednn']:.2f} | {med[2]:.2f} | {med[4]:.2f} | "
              f"{f'F({m},3)' if m else 'oneDNN'} | {med['onednn'] / med[m or 'onednn']:.2f}x |")


def _no_training(fits, *args, training: bool = False, **kwargs) -> bool:
    return fits(*args, **kwargs)


def packed_forward(conv, x: torch.Tensor) -> torch.Tensor:
    """A bf16-held KernelConv2d as it ran before bf16 Winograd: oneDNN on its packed weight."""
    return conv2d_packed(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, conv.packed)


def unet_forward(path: str, dtype: torch.dtype, runs: int = 4) -> None:
    """The whole UNet forward of `path` with Winograd (limner.kernels.conv2d as shipped) and without
    (oneDNN's direct convolutions), in turn. float32: one pipeline whose `faster` says no for the
    direct side; bf16: two pipelines (each convolution keeps one prepared weight: switching one
    pipeline back and forth would prepare it again at every call), the direct one's convolutions
    on conv2d_packed as before Winograd. With how far each is from the float32 forward (bf16)."""
    import limner
    from limner.protocols import TextEmbedding

    bf16 = dtype is torch.bfloat16
    shipped = cpu_winograd.faster
    torch.manual_seed(0)
    name = "bfloat16" if bf16 else "float32"
    pipes = {side: limner.load_pipeline(path, device="cpu", dtype=name) for side in ("winograd", "direct")} \
        if bf16 else dict.fromkeys(("winograd", "direct"), limner.load_pipeline(path, device="cpu", dtype=name))
    if bf16:
        for conv in pipes["direct"].model.denoiser.modules():
            if isinstance(conv, limner.nn.KernelConv2d):
                conv.forward = partial(packed_forward, conv)
    x = torch.randn(2, 4, 64, 64).contiguous(memory_format=pipes["winograd"].memory_format)
    ctx = torch.randn(2, 77, 768)
    cond = TextEmbedding(tokens=ctx, mask=torch.ones(2, 77, dtype=torch.bool), pooled=ctx[:, 0])

    def forward(side: str):
        if not bf16:
            cpu_winograd.faster = shipped if side == "winograd" else (lambda x, w: False)
        pipe = pipes[side]
        with limner.pipeline.autocast(pipe.dtype, torch.device("cpu")):
            return pipe.model.denoiser(x, torch.full((2,), 3.0), cond).float()

    with torch.no_grad(), freed_memory_kept():
        out = {side: forward(side) for side in ("direct", "winograd")}
        times = in_turn({"winograd": partial(forward, "winograd"), "direct": partial(forward, "direct")}, runs)
    cpu_winograd.faster = shipped
    med = medians(times)
    if bf16:
        del pipes
        with torch.no_grad():
            full = limner.load_pipeline(path, device="cpu", dtype="float32")
            ref = full.model.denoiser(x.float(), torch.full((2,), 3.0), cond)
        far = ", ".join(f"{side} {float((o - ref).norm() / ref.norm()):.2%}" for side, o in out.items())
        apart = f"distance from the float32 forward (norm of the difference / norm): {far}"
    else:
        apart = (f"largest output difference {float((out['winograd'] - out['direct']).abs().max()):.1e} (largest "
                 f"output {float(out['direct'].abs().max()):.1f})")
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads; `python benchmarks/winograd_conv.py --sd {path}"
          f"{' --dtype bf16' if bf16 else ''}`: SD 1.5-size UNet forward, {name}, batch 2, 64x64 latent, medians "
          f"of {runs} alternated: direct convolutions {med['direct']:.2f} s {[round(t, 2) for t in times['direct']]}, "
          f"Winograd {med['winograd']:.2f} s {[round(t, 2) for t in times['winograd']]}: "
          f"**{med['direct'] / med['winograd']:.2f}x**; {apart}.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd", help="an SD 1.5-size single-file checkpoint: also time its whole UNet forward")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="float32 (default) or bf16")
    parser.add_argument("--train", action="store_true", help="the demo UNet's convolutions forward + backward")
    parser.add_argument("--weight-grad", action="store_true", help="the weight's gradient alone, oneDNN and Winograd")
    args = parser.parse_args()
    if args.train or args.weight_grad:
        training() if args.train else weight_grads()
        raise SystemExit
    main(DTYPES[args.dtype])
    if args.sd:
        unet_forward(args.sd, DTYPES[args.dtype])
