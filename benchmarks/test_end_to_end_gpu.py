"""The two hot paths end to end, eager (LIMNER_KERNELS=eager, sdpa attention) against fused
(Triton kernels, measured `auto` attention): a guided denoising step (UNet and DiT forward
+ DPM-Solver++(2M) update) and a discriminator training step with R1 (StyleGAN2 D forward,
backward, and the double backward of the gradient penalty). bfloat16 autocast. CUDA only.
Targets: denoiser step >= 1.3x eager, discriminator step with R1 >= 1.5x eager."""
import pytest
import torch
import torch.nn.functional as F

import limner
from limner.protocols import TextEmbedding
from limner.sampling import Guided, bind_update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="end-to-end benchmarks need a CUDA GPU")
IMPLS = {"eager": ("eager", "sdpa"), "fused": ("triton", "auto")}
PROMPTS, TOKENS, TEXT_DIM = 8, 16, 384  # MiniLM-sized text states
DENOISERS = {
    # a latent-diffusion-sized UNet on 4x64x64 latents
    "unet": dict(in_channels=4, image_size=64, channels=128, mults=[1, 2, 2], blocks=2, attention_levels=[1, 2],
                 heads=8, groups=32),
    # DiT-S/2-like on 4x32x32 latents
    "dit": dict(in_channels=4, image_size=32, patch=2, dim=384, depth=12, heads=6),
}


def _text(batch: int) -> TextEmbedding:
    gen = torch.Generator("cuda").manual_seed(0)
    tokens = torch.randn(batch, TOKENS, TEXT_DIM, device="cuda", generator=gen)
    mask = torch.ones(batch, TOKENS, dtype=torch.bool, device="cuda")
    mask[:, 10:] = False
    return TextEmbedding(tokens, mask, tokens[:, 0])


def _use(monkeypatch, tmp_path, impl: str) -> None:
    kernels, attention = IMPLS[impl]
    monkeypatch.setenv("LIMNER_KERNELS", kernels)
    monkeypatch.setenv("LIMNER_ATTENTION", attention)
    monkeypatch.setenv("LIMNER_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(DENOISERS))
def test_denoiser_step(benchmark, name, impl, sync, tmp_path, monkeypatch):
    _use(monkeypatch, tmp_path, impl)
    options = DENOISERS[name]
    model = limner.create("denoisers", name, context_dim=TEXT_DIM, **options).cuda().eval()
    size, chans = options["image_size"], options["in_channels"]
    x = torch.randn(PROMPTS, chans, size, size, device="cuda") * 10
    old = torch.randn_like(x)
    step = bind_update(Guided(model, 7.5), x, {"cond": _text(PROMPTS), "uncond": _text(PROMPTS)})

    def run():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            step(x, 10.0, 0.8, 0.3, old, -0.1)
        sync()

    run()
    benchmark(run)
    params = sum(p.numel() for p in model.parameters())
    benchmark.extra_info.update(group="e2e", path=f"{name} denoiser step (CFG batch {2 * PROMPTS}, "
                                f"{chans}x{size}x{size}, {params / 1e6:.1f}M params)", impl=impl)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_discriminator_step_with_r1(benchmark, impl, sync, tmp_path, monkeypatch):
    _use(monkeypatch, tmp_path, impl)
    d = limner.create("discriminators", "stylegan2", context_dim=TEXT_DIM, channels=3, image_size=64,
                      channel_base=16384, channel_max=256).cuda()
    opt = torch.optim.Adam(d.parameters(), lr=1e-4)
    r1 = limner.create("losses", "r1", gamma=1.0)
    batch = 32
    real = torch.randn(batch, 3, 64, 64, device="cuda")
    fake = torch.randn(batch, 3, 64, 64, device="cuda")
    cond = _text(batch)

    def run():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.softplus(d(fake, cond)).mean() + F.softplus(-d(real, cond)).mean()
            loss = loss + r1(d, real, fake, cond, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    run()
    benchmark(run)
    params = sum(p.numel() for p in d.parameters())
    benchmark.extra_info.update(group="e2e", path=f"StyleGAN2 D step + R1 (batch {batch}, 3x64x64, "
                                f"{params / 1e6:.1f}M params)", impl=impl)
