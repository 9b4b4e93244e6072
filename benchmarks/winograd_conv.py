"""F.conv2d (oneDNN's direct convolution) against limner.kernels.conv2d (Winograd where it fits
and is faster, kernels/cpu_winograd.py) at the float32 3x3 convolution shapes of Stable Diffusion
1.5's UNet (64x64 latent, batch 2, guided), its VAE decoder (one 512x512 image) and the demo UNet
(configs/shapes-unet.toml, batch 2), channels-last, no grad, inside limner.pipeline.
freed_memory_kept as sampling runs them; each side called in turn. The count is how many such
convolutions one forward (one decode) runs, so each group's last line is its convolution time.

    python benchmarks/winograd_conv.py     # prints the markdown table (cpu-kernel-measurements.md)
    python benchmarks/winograd_conv.py --sd FILE   # and a whole UNet forward, Winograd on and off

--sd FILE (an SD 1.5-size checkpoint, e.g. from benchmarks/sd_full_size.py) adds the float32 UNet
forward (batch 2, 64x64 latent) with Winograd and without (limner's other kernels alike), in turn,
and the largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from in_turn import in_turn, medians

from limner.bench import cpu_name
from limner.kernels import conv2d, cpu_winograd
from limner.kernels.cpu_winograd import faster, tile
from limner.pipeline import freed_memory_kept

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


def main(runs: int = 7) -> None:
    torch.manual_seed(0)
    lines = [f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/winograd_conv.py`; float32, medians of {runs} calls "
             "a side, alternated (\"direct\": F(m,3) blank where the shape stays on F.conv2d):", "",
             "| shape: batch, in -> out, pixels | per pass | F.conv2d ms | limner ms | F(m,3) | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    with torch.no_grad(), freed_memory_kept():
        for group, shapes in SHAPES.items():
            lines.append(f"| *{group}* | | | | | |")
            total = {"direct": 0.0, "limner": 0.0}
            for n, cin, cout, size, count in shapes:
                x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last)
                w = torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5
                b = torch.randn(cout)
                sides = {"direct": partial(F.conv2d, x, w, b, 1, 1),
                         "limner": partial(conv2d, x, w, b, 1, 1, 1, 1)}
                med = {name: seconds * 1e3 for name, seconds in medians(in_turn(sides, runs)).items()}
                for name in total:
                    total[name] += med[name] * count
                m = tile(x) if faster(x, w) else None
                lines.append(f"| {n}, {cin} -> {cout}, {size}x{size} | {count} | {med['direct']:.2f} | "
                             f"{med['limner']:.2f} | {m or ''} | {med['direct'] / med['limner']:.2f}x |")
            digits = 0 if total["direct"] >= 100 else 2
            lines.append(f"| **{group}: its 3x3 convolutions** | | {total['direct']:.{digits}f} | "
                         f"{total['limner']:.{digits}f} | | "
                         f"**{total['direct'] / total['limner']:.2f}x** |")
    print("\n".join(lines))


def unet_forward(path: str, runs: int = 4) -> None:
    """The whole float32 UNet forward of `path` with Winograd (limner.kernels.conv2d as shipped)
    and without (its `faster` saying no: oneDNN's direct convolutions), in turn."""
    import limner
    from limner.protocols import TextEmbedding

    shipped = cpu_winograd.faster
    torch.manual_seed(0)
    pipe = limner.load_pipeline(path, device="cpu", dtype="float32")
    x = torch.randn(2, 4, 64, 64).contiguous(memory_format=pipe.memory_format)
    ctx = torch.randn(2, 77, 768)
    cond = TextEmbedding(tokens=ctx, mask=torch.ones(2, 77, dtype=torch.bool), pooled=ctx[:, 0])

    def forward(winograd: bool):
        cpu_winograd.faster = shipped if winograd else (lambda x, w: False)
        return pipe.model.denoiser(x, torch.full((2,), 3.0), cond)

    with torch.no_grad(), freed_memory_kept():
        direct = forward(False)
        diff, scale = float((forward(True) - direct).abs().max()), float(direct.abs().max())
        times = in_turn({"winograd": partial(forward, True), "direct": partial(forward, False)}, runs)
    cpu_winograd.faster = shipped
    med = medians(times)
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads; `python benchmarks/winograd_conv.py --sd {path}`: "
          f"SD 1.5-size UNet forward, float32, batch 2, 64x64 latent, medians of {runs} alternated: direct "
          f"convolutions {med['direct']:.2f} s {[round(t, 2) for t in times['direct']]}, Winograd "
          f"{med['winograd']:.2f} s {[round(t, 2) for t in times['winograd']]}: "
          f"**{med['direct'] / med['winograd']:.2f}x**; "
          f"largest output difference {diff:.1e} (largest output {scale:.1f}).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd", help="an SD 1.5-size single-file checkpoint: also time its whole UNet forward")
    args = parser.parse_args()
    main()
    if args.sd:
        unet_forward(args.sd)
