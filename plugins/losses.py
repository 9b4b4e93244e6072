"""Losses: GAN objectives, discriminator penalties and the VAE's ELBO.

Adversarial losses (D minimises d_real + d_fake, G minimises g; all means over the batch):
`nonsaturating` (Goodfellow et al. 2014), `hinge` (Lim & Ye 2017; Miyato et al. 2018),
`wgan` (Arjovsky et al. 2017). Penalties added to D's loss: `r1` (Mescheder et al. 2018,
lazy as in StyleGAN2), `wgan_gp` (Gulrajani et al. 2017; WGAN-GP = loss "wgan" + penalty
"wgan_gp"), `matching_aware` (Reed et al. 2016's GAN-CLS: a real image with the wrong
caption is fake). `elbo` for the VAE (Kingma & Welling 2014) with a KL warm-up (Bowman
et al. 2016).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import limner


class NonSaturating:
    """-log sigmoid(D(real)) - log(1 - sigmoid(D(fake))) for D; -log sigmoid(D(fake)) for G."""

    def d_real(self, logits):
        return F.softplus(-logits).mean()

    def d_fake(self, logits):
        return F.softplus(logits).mean()

    def g(self, logits):
        return F.softplus(-logits).mean()


class Hinge:
    """max(0, 1 - D(real)) + max(0, 1 + D(fake)) for D; -D(fake) for G."""

    def d_real(self, logits):
        return F.relu(1 - logits).mean()

    def d_fake(self, logits):
        return F.relu(1 + logits).mean()

    def g(self, logits):
        return -logits.mean()


class Wasserstein:
    """D(fake) - D(real) for the critic; -D(fake) for G. Needs a Lipschitz constraint (wgan_gp)."""

    def d_real(self, logits):
        return -logits.mean()

    def d_fake(self, logits):
        return logits.mean()

    def g(self, logits):
        return -logits.mean()


def _input_gradient(discriminator, images: torch.Tensor, cond) -> torch.Tensor:
    """d(sum of D's logits)/d(images), kept in the graph so the penalty trains D."""
    images = images.detach().requires_grad_(True)
    logits = discriminator(images, None if cond is None else cond.detach())
    (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return grad.flatten(1)


@dataclass
class R1:
    """gamma / 2 * E ||grad_x D(x)||^2 on real images (Mescheder et al. 2018, eq. 9)."""

    gamma: float = 1.0
    interval: int = 16

    def __call__(self, discriminator, real, fake, cond, adversarial):
        return self.gamma / 2 * _input_gradient(discriminator, real, cond).square().sum(dim=1).mean()


@dataclass
class GradientPenalty:
    """weight * E (||grad D(x_hat)|| - 1)^2 at random points between real and fake."""

    weight: float = 10.0
    interval: int = 1

    def __call__(self, discriminator, real, fake, cond, adversarial):
        u = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
        between = real.detach().lerp(fake.detach(), u)
        norm = _input_gradient(discriminator, between, cond).norm(dim=1)
        return self.weight * (norm - 1).square().mean()


@dataclass
class MatchingAware:
    """weight * the fake-side loss of D on real images with another sample's caption."""

    weight: float = 1.0
    interval: int = 1

    def __call__(self, discriminator, real, fake, cond, adversarial):
        if cond is None or real.shape[0] < 2:
            return real.new_zeros(())
        return self.weight * adversarial.d_fake(discriminator(real, cond.roll(1)))


def _positive(name: str, **values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise limner.LimnerError(f"{name}: {key} must be >= 0, got {value}")


def r1(gamma: float = 1.0, interval: int = 16):
    """R1 gradient penalty on real images, every `interval` steps (Mescheder et al. 2018)."""
    _positive("r1", gamma=gamma, interval=interval - 1)
    return R1(gamma, interval)


def wgan_gp(weight: float = 10.0, interval: int = 1):
    """Gradient penalty toward unit norm at interpolates (Gulrajani et al. 2017)."""
    _positive("wgan_gp", weight=weight, interval=interval - 1)
    return GradientPenalty(weight, interval)


def matching_aware(weight: float = 1.0, interval: int = 1):
    """Real image + mismatched caption counts as fake (Reed et al. 2016, GAN-CLS)."""
    _positive("matching_aware", weight=weight, interval=interval - 1)
    return MatchingAware(weight, interval)


@dataclass
class ELBO:
    """Negative ELBO per dimension: ||x - x_hat||^2 / (2 sigma^2) + beta_t KL(q(z|x) || N(0, I)),
    with beta_t ramping linearly from 0 to beta over `warmup` steps."""

    beta: float = 1.0
    warmup: int = 0
    sigma: float = 0.1

    def beta_at(self, step: int) -> float:
        return self.beta * min(1.0, step / self.warmup) if self.warmup > 0 else self.beta

    def __call__(self, x, recon, mean, logvar, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        dims = x[0].numel()
        rec = (x - recon).square().flatten(1).sum(dim=1) / (2 * self.sigma**2)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(dim=1)
        loss = (rec + self.beta_at(step) * kl).mean() / dims
        return loss, {"recon": rec.detach().mean().item() / dims, "kl": kl.detach().mean().item() / dims}


def elbo(beta: float = 1.0, warmup: int = 0, sigma: float = 0.1):
    """VAE loss: Gaussian reconstruction + beta * KL with a linear warm-up (Bowman et al. 2016)."""
    _positive("elbo", beta=beta, warmup=warmup, sigma=sigma)
    return ELBO(beta, warmup, sigma)
