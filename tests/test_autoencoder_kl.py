"""limner's AutoencoderKL against diffusers' on the same random weights: moments, encode and decode
to 1e-4 in float32; a tiny configuration as diffusers' own tests build it, no download."""
import pytest
import torch

import limner
from limner.plugins.autoencoder_kl import autoencoder_kl

diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32)


def pair(seed=0, **config):
    config = {**TINY, **config}
    torch.manual_seed(seed)
    anchor = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(
        config["block_out_channels"]), up_block_types=("UpDecoderBlock2D",) * len(config["block_out_channels"]),
        **config).eval()
    ours = autoencoder_kl(widths=list(config["block_out_channels"]), blocks=config["layers_per_block"],
                          latent_channels=config["latent_channels"], groups=config["norm_num_groups"],
                          scale=anchor.config.scaling_factor)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


@pytest.mark.parametrize("widths", [(32, 64), (32, 32, 64)])
def test_encode_and_decode_equal_diffusers_on_the_same_weights(widths):
    anchor, ours = pair(block_out_channels=widths)
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = anchor.encode(images).latent_dist
        mean, logvar = ours.moments(images)
        torch.testing.assert_close(mean, posterior.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logvar, posterior.logvar, atol=1e-4, rtol=1e-4)
        latents = ours.encode(images)
        torch.testing.assert_close(latents, posterior.mean * anchor.config.scaling_factor, atol=1e-4, rtol=1e-4)
        want = anchor.decode(latents / anchor.config.scaling_factor).sample
        torch.testing.assert_close(ours.decode(latents), want, atol=1e-4, rtol=1e-4)
    assert latents.shape == (2, 4, 24 // ours.factor, 24 // ours.factor) and ours.factor == 2 ** (len(widths) - 1)


def test_a_sampled_latent_is_the_mean_plus_scaled_noise_and_seeded():
    _, ours = pair()
    images = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        a = ours.encode(images, generator=torch.Generator().manual_seed(3))
        b = ours.encode(images, generator=torch.Generator().manual_seed(3))
        mean = ours.encode(images)
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_registered_and_options_checked():
    model = limner.create("autoencoders", "autoencoder_kl", widths=[32, 64], blocks=1)
    assert model.latent_shape(3, 64) == (4, 32, 32)
    with pytest.raises(limner.LimnerError, match="image size 63 must be a multiple of the autoencoder's factor 2"):
        model.latent_shape(3, 63)
    with pytest.raises(limner.LimnerError, match=r"widths must list whole numbers, each a multiple of groups \(32\)"):
        limner.create("autoencoders", "autoencoder_kl", widths=[48])
