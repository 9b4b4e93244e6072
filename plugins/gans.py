"""Text-conditional GANs: generators G(z, cond) -> image and discriminators D(image, cond) ->
logits [B], with cond a TextEmbedding whose pooled vector conditions both sides.

- `dcgan` generator: the [Z, N] design of Reed et al. 2016 ("Generative Adversarial
  Text to Image Synthesis"): compressed text Z concatenated with noise N, then DCGAN
  transposed convolutions (Radford et al. 2016).
- `stylegan2` generator and discriminator (Karras et al. 2020, "Analyzing and Improving
  the Image Quality of StyleGAN"): mapping network, modulated/demodulated convolutions,
  noise inputs, skip to-RGB outputs; residual discriminator with FIR resampling and
  minibatch std. Text enters the mapping network beside z, and the discriminator by
  projection onto a text embedding, as StyleGAN2-ADA conditions on labels.
- `projection` discriminator: Miyato & Koyama 2018 ("cGANs with Projection
  Discriminator"), spectral-normalised ResNet blocks, logit = psi(h) + <V t, h>.

`context_dim`, `channels` and `image_size` are set by the trainer from the text encoder and
dataset. `factory(...)(z, cond, truncation=psi, generator=g)`: psi < 1 pulls samples toward
the typical image of their prompt (the truncation trick), `generator` seeds noise inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import limner
from limner.kernels import bias_act, downsample2d, minibatch_std, setup_filter, upsample2d
from limner.protocols import TextEmbedding
from limner.sampling import randn_like

RESAMPLE_TAPS = [1, 3, 3, 1]  # StyleGAN2's binomial low-pass filter


def _levels(image_size: int) -> int:
    """Doublings from 4x4 to image_size, which must be a power of two >= 8."""
    levels = int(math.log2(image_size)) - 2
    if image_size < 8 or 4 * 2**levels != image_size:
        raise limner.LimnerError(f"GANs need image_size a power of two >= 8, got {image_size}")
    return levels


def _pooled(cond: TextEmbedding | None, batch: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The prompt vector [B, dim]; zeros without a prompt (unconditional)."""
    if cond is None:
        return like.new_zeros(batch, dim)
    return cond.pooled.to(like.dtype)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# --- equalised-learning-rate layers (Karras et al. 2018, sec. 4.1) -------------------------

class EqualLinear(nn.Module):
    """Weights stored N(0, 1) / lr_mul and scaled at run time, so Adam's step is the same
    relative size for every layer; bias_act applies the activation with its gain."""

    def __init__(self, cin: int, cout: int, act: str = "linear", lr_mul: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full([cout], bias_init / lr_mul))
        self.act, self.w_gain, self.b_gain = act, lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(F.linear(x, self.weight * self.w_gain), self.bias * self.b_gain, act=self.act)


class EqualConv2d(nn.Module):
    """Conv with equalised learning rate; `down` blurs with the FIR filter, then halves."""

    def __init__(self, cin: int, cout: int, kernel: int, act: str = "lrelu", bias: bool = True,
                 down: bool = False, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.w_gain, self.act, self.down, self.gain = 1 / math.sqrt(cin * kernel * kernel), act, down, gain
        self.register_buffer("taps", setup_filter(RESAMPLE_TAPS), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = downsample2d(x, self.taps)
        x = F.conv2d(x, self.weight * self.w_gain, padding=self.weight.shape[-1] // 2)
        default_gain = math.sqrt(2) if self.act in ("lrelu", "relu", "swish") else 1.0
        return bias_act(x, self.bias, act=self.act, gain=default_gain * self.gain)


# --- StyleGAN2 generator ---------------------------------------------------------------------

class Mapping(nn.Module):
    """z and the prompt vector, each normalised, concatenated, through an 8-layer-style MLP with
    a 100x lower learning rate (StyleGAN's mapping network; labels embedded as in ADA)."""

    def __init__(self, z_dim: int, context_dim: int, text_dim: int, w_dim: int, layers: int):
        super().__init__()
        self.context_dim = context_dim
        self.text = EqualLinear(context_dim, text_dim)
        dims = [z_dim + text_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, act="lrelu", lr_mul=0.01) for a, b in zip(dims, dims[1:])])

    def forward(self, z: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        t = self.text(_pooled(cond, z.shape[0], self.context_dim, z))
        return self.net(torch.cat([normalize_2nd_moment(z), normalize_2nd_moment(t)], dim=1))


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     demodulate: bool = True) -> torch.Tensor:
    """Per-sample weights w * s (modulation), rescaled to unit norm per output channel
    (demodulation, StyleGAN2 eq. 1-3); one grouped conv over the batch.
    x: [N, I, H, W]; weight: [O, I, k, k]; styles: [N, I]."""
    n, cin, h, w = x.shape
    wt = weight[None] * styles[:, None, :, None, None]  # [N, O, I, k, k]
    if demodulate:
        wt = wt * (wt.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    out = F.conv2d(x.reshape(1, n * cin, h, w), rearrange(wt, "n o i kh kw -> (n o) i kh kw"),
                   padding=weight.shape[-1] // 2, groups=n)
    return out.reshape(n, -1, *out.shape[2:])


class SynthesisLayer(nn.Module):
    """(Upsample) -> modulated 3x3 conv -> + scaled noise -> bias + lrelu."""

    def __init__(self, cin: int, cout: int, w_dim: int, up: bool = False, clamp: float | None = 256.0):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.up, self.clamp = up, clamp
        self.register_buffer("taps", setup_filter(RESAMPLE_TAPS), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.up:
            x = upsample2d(x, self.taps)
        x = modulated_conv2d(x, self.weight, self.affine(w))
        n, _, h, wd = x.shape
        noise = randn_like(x[:, :1], generator)  # [n, 1, h, wd]; a list of generators: one stream per item
        return bias_act(x + noise * self.noise_strength, self.bias, act="lrelu", clamp=self.clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation: this resolution's contribution to the image."""

    def __init__(self, cin: int, channels: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(channels, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.w_gain = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.w_gain, demodulate=False)
        return bias_act(x, self.bias, act="linear")


class StyleGAN2Generator(nn.Module):
    """Mapping z, text -> w; a learned 4x4 constant grown by doubling blocks, each adding its
    to-RGB output to the upsampled image so far (the skip architecture)."""

    def __init__(self, context_dim: int, channels: int, image_size: int, z_dim: int, w_dim: int,
                 mapping_layers: int, text_dim: int, channel_base: int, channel_max: int):
        super().__init__()
        levels = _levels(image_size)
        ch = [min(channel_base // 2 ** (i + 2), channel_max) for i in range(levels + 1)]  # per resolution
        self.z_shape, self.w_dim = (z_dim,), w_dim
        self.mapping = Mapping(z_dim, context_dim, text_dim, w_dim, mapping_layers)
        self.const = nn.Parameter(torch.randn(ch[0], 4, 4))
        self.layers = nn.ModuleList([SynthesisLayer(ch[0], ch[0], w_dim)])
        self.to_rgb = nn.ModuleList([ToRGB(ch[0], channels, w_dim)])
        for a, b in zip(ch, ch[1:]):
            self.layers.extend([SynthesisLayer(a, b, w_dim, up=True), SynthesisLayer(b, b, w_dim)])
            self.to_rgb.append(ToRGB(b, channels, w_dim))
        self.register_buffer("taps", setup_filter(RESAMPLE_TAPS), persistent=False)

    def w_of(self, z: torch.Tensor, cond: TextEmbedding | None, truncation: float = 1.0,
             centre_samples: int = 64) -> torch.Tensor:
        """The style vector; with truncation psi < 1, lerp from the prompt's centre of W (the
        mean w of `centre_samples` fixed z's for that prompt; a per-condition centre keeps the
        prompt's content, where the global mean of ADA would wash it out)."""
        w = self.mapping(z, cond)
        if truncation == 1.0:
            return w
        fixed = torch.randn((centre_samples, z.shape[1]), generator=torch.Generator().manual_seed(0)).to(z)
        zs = fixed.repeat(z.shape[0], 1)
        reps = None if cond is None else cond.repeat(centre_samples)
        centre = self.mapping(zs, reps).reshape(z.shape[0], centre_samples, -1).mean(dim=1)
        return centre.lerp(w, truncation)

    def forward(self, z: torch.Tensor, cond: TextEmbedding | None, truncation: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        w = self.w_of(z, cond, truncation)
        x = self.const[None].expand(z.shape[0], -1, -1, -1)
        x = self.layers[0](x, w, generator)
        image = self.to_rgb[0](x, w)
        for i, to_rgb in enumerate(self.to_rgb[1:]):
            x = self.layers[2 * i + 2](self.layers[2 * i + 1](x, w, generator), w, generator)
            image = upsample2d(image, self.taps) + to_rgb(x, w)
        return image


def stylegan2(context_dim: int, channels: int = 3, image_size: int = 32, z_dim: int = 64, w_dim: int = 128,
              mapping_layers: int = 4, text_dim: int = 64, channel_base: int = 2048, channel_max: int = 128):
    """StyleGAN2 generator with text in the mapping network (Karras et al. 2020)."""
    return StyleGAN2Generator(context_dim, channels, image_size, z_dim, w_dim, mapping_layers, text_dim,
                              channel_base, channel_max)


# --- DCGAN generator ---------------------------------------------------------------------------

class DCGANGenerator(nn.Module):
    """[Z, N] -> 4x4 features -> transposed-conv doublings with BatchNorm + ReLU -> tanh."""

    def __init__(self, context_dim: int, channels: int, image_size: int, z_dim: int, text_dim: int, width: int):
        super().__init__()
        levels = _levels(image_size)
        self.z_shape, self.context_dim = (z_dim,), context_dim
        self.text = nn.Sequential(nn.Linear(context_dim, text_dim), nn.LeakyReLU(0.2))
        ch = [width * 2 ** (levels - i) for i in range(levels + 1)]
        self.stem = nn.Sequential(nn.Linear(z_dim + text_dim, ch[0] * 16), nn.Unflatten(1, (ch[0], 4, 4)),
                                  nn.BatchNorm2d(ch[0]), nn.ReLU())
        self.ups = nn.Sequential(*[nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                                                 nn.ReLU()) for a, b in zip(ch, ch[1:])])
        self.out = nn.Conv2d(ch[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cond: TextEmbedding | None, truncation: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        # truncation scales z toward 0: the reduced-temperature trick of Kingma & Dhariwal 2018
        t = self.text(_pooled(cond, z.shape[0], self.context_dim, z))
        return torch.tanh(self.out(self.ups(self.stem(torch.cat([t, z * truncation], dim=1)))))


def dcgan(context_dim: int, channels: int = 3, image_size: int = 32, z_dim: int = 64, text_dim: int = 64,
          width: int = 32):
    """DCGAN generator fed [text Z, noise N] (Reed et al. 2016)."""
    return DCGANGenerator(context_dim, channels, image_size, z_dim, text_dim, width)


# --- StyleGAN2 discriminator -----------------------------------------------------------------

class DBlock(nn.Module):
    """3x3 conv, blurred-downsampling 3x3 conv, and a 1x1 residual path, summed at 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0 = EqualConv2d(cin, cin, 3)
        self.conv1 = EqualConv2d(cin, cout, 3, down=True, gain=math.sqrt(0.5))
        self.skip = EqualConv2d(cin, cout, 1, act="linear", bias=False, down=True, gain=math.sqrt(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv1(self.conv0(x))


class StyleGAN2Discriminator(nn.Module):
    """from-RGB, residual blocks down to 4x4, minibatch std, conv, FC; the logit is the
    projection of the features onto a mapped text embedding (StyleGAN2-ADA's cmap)."""

    def __init__(self, context_dim: int, channels: int, image_size: int, channel_base: int, channel_max: int,
                 cmap_dim: int, mbstd_group: int):
        super().__init__()
        levels = _levels(image_size)
        ch = [min(channel_base // 2 ** (i + 2), channel_max) for i in range(levels + 1)][::-1]  # top res first
        self.context_dim, self.cmap_dim, self.mbstd_group = context_dim, cmap_dim, mbstd_group
        self.from_rgb = EqualConv2d(channels, ch[0], 1)
        self.blocks = nn.Sequential(*[DBlock(a, b) for a, b in zip(ch, ch[1:])])
        self.conv = EqualConv2d(ch[-1] + 1, ch[-1], 3)
        self.fc = EqualLinear(ch[-1] * 16, ch[-1], act="lrelu")
        self.out = EqualLinear(ch[-1], cmap_dim)
        self.text = nn.Sequential(EqualLinear(context_dim, cmap_dim, act="lrelu"), EqualLinear(cmap_dim, cmap_dim))

    def forward(self, image: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        x = self.blocks(self.from_rgb(image))
        x = self.conv(minibatch_std(x, math.gcd(x.shape[0], self.mbstd_group)))
        h = self.out(self.fc(x.flatten(1)))  # [B, cmap_dim]
        cmap = self.text(_pooled(cond, image.shape[0], self.context_dim, h))
        return (h * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)


def stylegan2_discriminator(context_dim: int, channels: int = 3, image_size: int = 32, channel_base: int = 2048,
                            channel_max: int = 128, cmap_dim: int = 128, mbstd_group: int = 4):
    """StyleGAN2 residual discriminator, text-conditioned by projection (Karras et al. 2020)."""
    return StyleGAN2Discriminator(context_dim, channels, image_size, channel_base, channel_max, cmap_dim,
                                  mbstd_group)


# --- projection discriminator ----------------------------------------------------------------

class SNBlock(nn.Module):
    """Pre-activation residual block of SN-ResNet (Miyato et al. 2018), average-pool down."""

    def __init__(self, cin: int, cout: int, first: bool = False):
        super().__init__()
        self.first = first
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x if self.first else F.relu(x))
        h = F.avg_pool2d(self.conv2(F.relu(h)), 2)
        skip = self.skip(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.skip(x), 2)
        return h + skip


class ProjectionDiscriminator(nn.Module):
    """ResNet features h = sum over pixels; logit = psi(h) + <V t, h> with t the prompt vector,
    plus (`spatial`) a projection of each cell of the final 4x4 map onto its own embedding of
    the prompt: the pixel sum forgets where things are, so without it D cannot tell "at the
    top left" from "at the bottom right" and G is never taught placement."""

    def __init__(self, context_dim: int, channels: int, image_size: int, width: int, spatial: bool):
        super().__init__()
        levels = _levels(image_size)
        ch = [channels] + [width * 2 ** min(i, 3) for i in range(levels)]
        self.context_dim = context_dim
        self.blocks = nn.Sequential(*[SNBlock(a, b, first=i == 0) for i, (a, b) in enumerate(zip(ch, ch[1:]))])
        self.psi = spectral_norm(nn.Linear(ch[-1], 1))
        self.embed = spectral_norm(nn.Linear(context_dim, ch[-1], bias=False))
        self.embed_cells = spectral_norm(nn.Linear(context_dim, ch[-1] * 16, bias=False)) if spatial else None

    def forward(self, image: torch.Tensor, cond: TextEmbedding | None) -> torch.Tensor:
        cells = F.relu(self.blocks(image))  # [B, C, 4, 4]
        h = cells.sum(dim=(2, 3))  # [B, C]
        t = _pooled(cond, image.shape[0], self.context_dim, h)
        logit = self.psi(h).squeeze(1) + (self.embed(t) * h).sum(dim=1)
        if self.embed_cells is not None:
            logit = logit + (self.embed_cells(t) * cells.flatten(1)).sum(dim=1)
        return logit


def projection(context_dim: int, channels: int = 3, image_size: int = 32, width: int = 64, spatial: bool = True):
    """Spectral-norm ResNet discriminator with a text projection (Miyato & Koyama 2018), per
    cell of its 4x4 map too when `spatial`."""
    return ProjectionDiscriminator(context_dim, channels, image_size, width, spatial)
