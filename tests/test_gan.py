"""GANs and VAEs: losses against their formulas, R1 against finite differences, generators
and discriminators that read the caption, and training that learns, resumes and samples."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import limner
from limner.checkpoint import find_checkpoint
from limner.cli import main
from limner.protocols import TextEmbedding
from limner.recipes import train


def embedding(pooled: torch.Tensor) -> TextEmbedding:
    b, d = pooled.shape
    return TextEmbedding(pooled[:, None, :], torch.ones(b, 1, dtype=torch.bool), pooled)


# --- losses ----------------------------------------------------------------------------------

def test_adversarial_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.5])
    ns, hinge, wgan = (limner.create("losses", n) for n in ("nonsaturating", "hinge", "wgan"))
    sig = torch.sigmoid
    torch.testing.assert_close(
        ns.d_real(real) + ns.d_fake(fake), -(sig(real).log().mean() + (1 - sig(fake)).log().mean())
    )
    torch.testing.assert_close(ns.g(fake), -sig(fake).log().mean())
    torch.testing.assert_close(
        hinge.d_real(real) + hinge.d_fake(fake), torch.tensor((0 + 2 + 0.5) / 3 + (0 + 1.2 + 2.5) / 3)
    )
    torch.testing.assert_close(hinge.g(fake), -fake.mean())
    torch.testing.assert_close(wgan.d_real(real) + wgan.d_fake(fake), fake.mean() - real.mean())


class LinearCritic(torch.nn.Module):
    """D(x) = <a, x>: every input gradient is a, so the penalties have closed forms."""

    def __init__(self, shape):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))

    def forward(self, x, cond):
        return (x * self.a).flatten(1).sum(dim=1)


def test_r1_and_gradient_penalty_on_a_linear_critic_are_exact():
    d = LinearCritic((3, 4, 4))
    real, fake = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    norm_sq = float(d.a.detach().square().sum())
    r1 = limner.create("losses", "r1", gamma=0.3)
    assert math.isclose(r1(d, real, fake, None, None).item(), 0.3 / 2 * norm_sq, rel_tol=1e-12)
    gp = limner.create("losses", "wgan_gp", weight=10.0)
    assert math.isclose(gp(d, real, fake, None, None).item(), 10 * (math.sqrt(norm_sq) - 1) ** 2, rel_tol=1e-12)
    with torch.no_grad():
        d.a /= d.a.norm()
    assert gp(d, real, fake, None, None).item() < 1e-20  # a 1-Lipschitz critic is not penalised


def test_r1_equals_a_finite_difference_estimate_of_the_gradient_norm():
    torch.manual_seed(0)
    d = limner.create("discriminators", "stylegan2", context_dim=5, channels=1, image_size=8, channel_base=64,
                      channel_max=8, cmap_dim=4).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    cond = embedding(torch.randn(2, 5, dtype=torch.float64))
    penalty = limner.create("losses", "r1", gamma=1.0)(d, x, None, cond, None).item()
    h, grad = 1e-5, torch.zeros_like(x).flatten()
    with torch.no_grad():
        for i in range(x.numel()):  # central differences of sum(D) along every input pixel
            e = torch.zeros_like(x).flatten()
            e[i] = h
            e = e.view_as(x)
            grad[i] = (d(x + e, cond).sum() - d(x - e, cond).sum()) / (2 * h)
    estimate = 0.5 * grad.view(2, -1).square().sum(dim=1).mean()
    assert penalty > 0 and math.isclose(penalty, float(estimate), rel_tol=1e-6)


def test_matching_aware_treats_a_wrong_caption_as_fake():
    class CaptionChecker(torch.nn.Module):
        """+10 when the caption vector matches the image's brightness, else -10."""

        def forward(self, x, cond):
            return torch.where((x.mean(dim=(1, 2, 3)) - cond.pooled[:, 0]).abs() < 1e-6, 10.0, -10.0)

    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 2, 2)
    cond = embedding(torch.arange(4.0)[:, None])
    ns = limner.create("losses", "nonsaturating")
    term = limner.create("losses", "matching_aware", weight=2.0)(CaptionChecker(), x, None, cond, ns)
    torch.testing.assert_close(term, 2.0 * torch.nn.functional.softplus(torch.tensor(-10.0)))  # all judged fake
    blind = limner.create("losses", "matching_aware")(lambda x, c: torch.full((4,), 10.0), x, None, cond, ns)
    assert float(blind) > 9  # a D that ignores the caption pays for it


def test_elbo_kl_warmup_and_reconstruction():
    elbo = limner.create("losses", "elbo", beta=2.0, warmup=10, sigma=0.5)
    x, recon = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    mean, logvar = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    rec = ((x - recon) ** 2).flatten(1).sum(1).mean() / (2 * 0.25)
    for step, beta in [(0, 0.0), (5, 1.0), (10, 2.0), (50, 2.0)]:
        loss, parts = elbo(x, recon, mean, logvar, step)
        torch.testing.assert_close(loss, (rec + beta * kl) / 16)
    assert math.isclose(parts["kl"], float(kl) / 16, rel_tol=1e-5)
    with pytest.raises(limner.LimnerError, match="elbo: sigma must be >= 0, got -1"):
        limner.create("losses", "elbo", sigma=-1)


# --- generators and discriminators -----------------------------------------------------------

@pytest.mark.parametrize("name", ["stylegan2", "dcgan", "vae"])
def test_generators_read_the_caption_and_repeat_with_the_seed(name):
    torch.manual_seed(0)
    g = limner.create("generators", name, context_dim=6, channels=3, image_size=16).eval()
    z = torch.randn(2, *g.z_shape)
    a, b = embedding(torch.randn(2, 6)), embedding(torch.randn(2, 6))

    def draw(z, cond, truncation=1.0):
        return g(z, cond, truncation=truncation, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        out = draw(z, a)
        assert out.shape == (2, 3, 16, 16)
        torch.testing.assert_close(draw(z, a), out)
        assert (draw(z, b) - out).abs().mean() > 1e-3  # another caption, another image
        z2 = torch.randn_like(z)
        torch.testing.assert_close(draw(z2, a, truncation=0.0), draw(z, a, truncation=0.0))  # psi=0: the centre


@pytest.mark.parametrize("name", ["stylegan2", "projection"])
def test_discriminators_give_one_logit_per_image_that_depends_on_the_caption(name):
    torch.manual_seed(0)
    d = limner.create("discriminators", name, context_dim=6, channels=3, image_size=16).eval()
    x = torch.randn(6, 3, 16, 16)  # 6 images: the minibatch-std groups must adapt
    with torch.no_grad():
        logits = d(x, embedding(torch.randn(6, 6)))
        assert logits.shape == (6,)
        assert (d(x, embedding(torch.randn(6, 6))) - logits).abs().max() > 1e-4


def test_gan_sizes_must_be_powers_of_two():
    with pytest.raises(limner.LimnerError, match="power of two >= 8, got 24"):
        limner.create("generators", "stylegan2", context_dim=4, image_size=24)


# --- training ------------------------------------------------------------------------------

GAN = """
out = "{out}"
recipe = "{recipe}"
seed = 1
[data]
dataset = {{ name = "shapes", size = 32, length = 512, max_objects = 1 }}
batch_size = 8
[model]
text_encoder = {{ name = "clip_text", dim = 16, layers = 1, heads = 2, max_length = 48 }}
generator = {generator}
discriminator = {{ name = "stylegan2", channel_base = 256, channel_max = 32, cmap_dim = 16 }}
[train]
steps = {steps}
lr = {lr}
d_lr = 2e-3
log_every = 1
sample_every = 1000
checkpoint_every = 5
penalties = [{{ name = "r1", gamma = 0.1, interval = 4 }}, "matching_aware"]
loss = "{loss}"
[sample]
prompts = ["a red circle at the top left", "a blue square at the center"]
"""
STYLEGAN = '{ name = "stylegan2", z_dim = 16, w_dim = 32, mapping_layers = 2, channel_base = 256, channel_max = 32 }'
VAE = '{ name = "vae", width = 16, latent_channels = 2 }'


def gan_config(tmp_path, name="gan", steps=10, recipe="gan", generator=STYLEGAN, lr=2e-3, loss=None):
    path = tmp_path / f"{name}.toml"
    loss = loss or ("elbo" if recipe == "vae" else "nonsaturating")  # the framework has no default loss
    path.write_text(GAN.format(out=(tmp_path / name).as_posix(), steps=steps, recipe=recipe, generator=generator,
                               lr=lr, loss=loss))
    return path


def test_discriminator_learns_to_separate_real_from_fake(tmp_path):
    trainer = train(gan_config(tmp_path, steps=40))
    data = limner.create("datasets", "shapes", size=32, split="test", max_objects=1, length=32)
    real = torch.stack([data[i][0] for i in range(32)])
    captions = [data[i][1] for i in range(32)]
    with torch.no_grad():
        cond = trainer.model.encode(captions)
        fake = trainer.model.generator(torch.randn(32, 16, generator=torch.Generator().manual_seed(5)), cond)
        real_logits, fake_logits = trainer.disc(real, cond), trainer.disc(fake, cond)
    assert real_logits.mean() > fake_logits.mean() + 0.5, (real_logits.mean(), fake_logits.mean())
    logged = [json.loads(line) for line in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 41))
    assert sum("r1" in row for row in logged) == 10  # lazy: every 4th step


def test_gan_resume_is_exact_and_samples_from_the_cli(tmp_path, capsys):
    straight = train(gan_config(tmp_path, "straight", steps=10))
    interrupted = gan_config(tmp_path, "interrupted", steps=10)
    train(interrupted, {"train.steps": 5})
    assert train(interrupted).step == 10 == straight.step
    for name in ("model", "ema", "discriminator"):
        a = load_file(find_checkpoint(tmp_path / "straight") / f"{name}.safetensors")
        b = load_file(find_checkpoint(tmp_path / "interrupted") / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name

    pipe = limner.load_pipeline(tmp_path / "straight")
    one, again = pipe("a red circle", seed=3, truncation=0.5), pipe("a red circle", seed=3, truncation=0.5)
    assert one[0].tobytes() == again[0].tobytes()
    alone = pipe.generate(["a blue square"], seed=3)  # per-image noise streams: the batch does not matter
    assert (pipe.generate(["a red circle", "a blue square"], seed=3)[1] - alone[0]).abs().max() < 1e-4
    out = tmp_path / "samples"
    main(["sample", str(tmp_path / "straight"), "-p", "a red circle", "-p", "a blue square", "--num", "2",
          "--truncation", "0.7", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["000-a-red-circle.png", "001-a-red-circle.png",
                                                     "002-a-blue-square.png", "003-a-blue-square.png", "grid-000.png",
                                                     "prompts.jsonl"]
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "straight"), "-p", "a red circle", "--sampler", "euler", "--out", str(out)])
    assert "sampler does not apply here: a " in capsys.readouterr().err


def test_two_gan_processes_end_with_identical_weights(tmp_path, train_two_ranks):
    """Gradients (R1's double backward included) are averaged by hand across gloo ranks."""
    ranks = train_two_ranks(gan_config(tmp_path, steps=3), tmp_path, port=29519)
    assert ranks["step"] == 3 and len(ranks["digests"]) == 2
    assert ranks["digests"][0] == ranks["digests"][1]


def test_vae_training_lowers_the_elbo(tmp_path):
    train(gan_config(tmp_path, "vae", steps=100, recipe="vae", generator=VAE, lr=2e-3))
    rows = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    pipe = limner.load_pipeline(tmp_path / "vae")
    assert pipe("a red circle", seed=0)[0].size == (32, 32)


def test_vae_reconstructions_score_above_its_samples_and_gans_cannot_reconstruct(tmp_path, capsys):
    """`limner eval --reconstruct`: held-out images through the shipped VAE's encoder and decoder
    come back closer (PSNR) than samples of their prompts; a GAN says it has no encoder."""
    from limner.recipes import evaluate_checkpoint

    vae = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-vae"
    rec = evaluate_checkpoint(vae, 40, metrics=["psnr", "ssim"], reconstruct=True)
    drawn = evaluate_checkpoint(vae, 40, metrics=["psnr", "ssim"])
    assert rec["reconstruct"] and rec["scores"]["psnr"] > drawn["scores"]["psnr"] + 3
    assert rec["scores"]["ssim"] > drawn["scores"]["ssim"]
    with pytest.raises(limner.LimnerError, match="takes a VAE checkpoint and no sampling options"):
        evaluate_checkpoint(vae, 4, metrics=["psnr"], reconstruct=True, truncation=0.5)
    gan = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-gan"
    with pytest.raises(SystemExit):
        main(["eval", str(gan), "--prompts", "4", "--metrics", "psnr", "--reconstruct"])
    assert "has no encoder: only a VAE checkpoint reconstructs" in capsys.readouterr().err


def test_reconstruction_term_is_logged_and_checked(tmp_path):
    path = gan_config(tmp_path, "rec", steps=3)
    path.write_text(path.read_text().replace("[train]\n", "[train]\nreconstruction = 5.0\n"))
    train(path)
    rows = [json.loads(line) for line in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["mse"] > 0 for row in rows)
    bad = gan_config(tmp_path, "neg", steps=3)
    bad.write_text(bad.read_text().replace("[train]\n", "[train]\nreconstruction = -1.0\n"))
    with pytest.raises(limner.LimnerError, match="train.reconstruction: must be >= 0, got -1.0"):
        train(bad)


def test_recipe_and_loss_mistakes_are_named(tmp_path):
    bad = gan_config(tmp_path, "typo", recipe="gna")
    with pytest.raises(limner.LimnerError, match="recipe: unknown recipe 'gna'. Did you mean: gan"):
        train(bad)
    with pytest.raises(limner.LimnerError, match="recipe 'vae' needs a generator with encode/decode"):
        train(gan_config(tmp_path, "vae_of_stylegan", recipe="vae"))
    path = gan_config(tmp_path, "wrong_loss", loss="elbo")
    with pytest.raises(limner.LimnerError, match="train.loss 'elbo' does not fit recipe 'gan'"):
        train(path)
    path = gan_config(tmp_path, "no_disc")
    path.write_text(path.read_text().replace("discriminator = ", "# discriminator = "))
    with pytest.raises(limner.LimnerError, match="recipe 'gan' needs model.discriminator"):
        train(path)
    path = gan_config(tmp_path, "no_loss")
    path.write_text(path.read_text().replace('loss = "nonsaturating"', ""))
    with pytest.raises(limner.LimnerError, match="train.loss: missing required option"):
        train(path)


@pytest.mark.parametrize("recipe", ["gan", "vae"])
def test_a_skipped_step_updates_neither_the_generator_nor_its_ema(tmp_path, recipe):
    """The non-finite guard's skip is honoured by the GAN and VAE steps as by the diffusion one:
    no update, no EMA average, no log row (issue 24)."""
    trainer = train(gan_config(tmp_path, recipe=recipe, steps=2, generator=VAE if recipe == "vae" else STYLEGAN))
    trainer.progress = type("Bar", (), {"write": lambda self, text: None})()
    data = trainer.dataset
    images, captions = torch.stack([data[i][0] for i in range(4)]), [data[i][1] for i in range(4)]
    before = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}
    generator = {k: v.clone() for k, v in trainer.model.generator.state_dict().items()}
    trainer.guard.check = lambda *args: False  # every update of this step is refused
    assert trainer.train_step(images, captions) is None
    assert all(torch.equal(before[k], v) for k, v in trainer.ema.model.state_dict().items())
    assert all(torch.equal(generator[k], v) for k, v in trainer.model.generator.state_dict().items())
