"""Minibatch standard deviation (Karras et al. 2018, "Progressive Growing of GANs", sec. 3;
grouped as in StyleGAN2): the discriminator sees how varied a group of samples is, which
penalises mode collapse. Eager reference; the Triton kernel plugs in here."""
from __future__ import annotations

import torch

from ._backend import resolve


def minibatch_std_reference(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """x [N, C, H, W] -> [N, C + num_channels, H, W]: sample n joins group n % (N / G); each
    group's per-feature std over its G members, averaged over C/num_channels channels and pixels."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g or c % num_channels:
        raise ValueError(f"minibatch_std: batch {n} must divide into groups of {g} and channels {c} "
                         f"into {num_channels} parts")
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in >= fp32
    y = y.reshape(g, n // g, num_channels, c // num_channels, h, w)  # [g, m, f, c/f, h, w]
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # [m, f, c/f, h, w]
    y = y.mean(dim=(2, 3, 4))  # [m, f]
    y = y.repeat(g, 1)[:, :, None, None].expand(n, num_channels, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


def minibatch_std(x, group_size=4, num_channels=1, backend="auto"):
    """Append the minibatch-std feature maps; see minibatch_std_reference."""
    resolve("minibatch_std", backend, x, has_triton=False)
    return minibatch_std_reference(x, group_size, num_channels)
