"""limner's Stable Diffusion UNet against diffusers' UNet2DConditionModel on the same random weights
(tiny configurations as diffusers' own tests build them, no download): SD 1-style conv projections
with heads given by count, SD 2-style linear projections with heads given by width, odd latent
sizes, and the sigma-driven denoiser against the anchor's prediction at the matching timestep."""
import pytest
import torch

import limner
from limner.noise import SigmaTable, ddpm_sigmas
from limner.plugins.sd_unet import sd_unet
from limner.protocols import TextEmbedding

diffusers = pytest.importorskip("diffusers")


def pair(channels=(32, 64), attention=(True, False), linear=False, head_dim=0, heads=(2, 4), context=24, size=16):
    types = {True: ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), False: ("DownBlock2D", "UpBlock2D")}
    torch.manual_seed(0)
    anchor = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=tuple(types[a][0] for a in attention), up_block_types=tuple(types[a][1] for a in
                                                                                    attention[::-1]),
        cross_attention_dim=context, norm_num_groups=32, use_linear_projection=linear,
        attention_head_dim=tuple(c // head_dim for c in channels) if head_dim else heads).eval()
    ours = sd_unet(context, image_size=size, channels=list(channels), attention=list(attention), heads=list(heads),
                   head_dim=head_dim, linear_projection=linear).eval()
    ours.net.unet.load_state_dict(anchor.state_dict())
    return anchor, ours


@pytest.mark.parametrize("config, size", [
    (dict(), 16),  # SD 1: conv projections, heads by count
    (dict(linear=True, head_dim=16), 16),  # SD 2: linear projections, heads by width
    (dict(channels=(32, 32, 64), attention=(True, True, False), heads=(2, 2, 4)), 18),  # odd sizes come back up
])
def test_unet_equals_diffusers_on_the_same_weights(config, size):
    anchor, ours = pair(**config)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, size, size, generator=gen), torch.randn(2, 7, 24, generator=gen)
    t = torch.tensor([10.0, 513.25])
    with torch.no_grad():
        want = anchor(x, t, encoder_hidden_states=context).sample
        got = ours.net.unet(x, t, context)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_denoiser_is_the_models_prediction_at_the_matching_timestep(prediction):
    """D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)) for epsilon models (k-diffusion's
    DiscreteEpsDDPMDenoiser), and the v-prediction form with sigma_data = 1 for v models."""
    anchor, ours = pair()
    ours = sd_unet(24, image_size=16, channels=[32, 64], attention=[True, False], heads=[2, 4], prediction=prediction)
    ours.net.unet.load_state_dict(anchor.state_dict())
    gen = torch.Generator().manual_seed(2)
    x, tokens = torch.randn(2, 4, 16, 16, generator=gen) * 3, torch.randn(2, 7, 24, generator=gen)
    sigma = torch.tensor([0.5, 7.0])
    cond = TextEmbedding(tokens, torch.ones(2, 7, dtype=torch.bool), tokens[:, 0])
    t = SigmaTable(ddpm_sigmas("scaled_linear")).timestep(sigma).float()
    scale = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        out = anchor(x * scale, t, encoder_hidden_states=tokens).sample
        got = ours(x, sigma, cond)
    s = sigma.view(-1, 1, 1, 1)
    want = x - s * out if prediction == "eps" else x / (s**2 + 1) - s * scale * out
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_registered_and_options_checked():
    model = limner.create("denoisers", "sd_unet", context_dim=8, channels=[32], attention=[True], heads=[4],
                          image_size=8)
    assert model.parameterization == "eps" and model.sigma_data == 1.0
    with pytest.raises(limner.LimnerError, match=r"each level's channels must split into its heads evenly"):
        sd_unet(8, channels=[32, 64], attention=[True, True], heads=[3, 4])
    with pytest.raises(limner.LimnerError, match=r"attention must give one value per level \(2\)"):
        sd_unet(8, channels=[32, 64], attention=[True])
    with pytest.raises(limner.LimnerError, match="prediction must be one of eps, epsilon, v, v_prediction"):
        sd_unet(8, channels=[32], attention=[True], heads=[4], image_size=8, prediction="x0")
