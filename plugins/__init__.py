"""limner's built-in components: one sub-plugin per module, registered lazily.

The `limner` entry point loads this package; the registry then registers every sub-plugin
in PLUGINS, exactly as it would a third-party plugin. Each factory is named by where it
lives ("limner.plugins.module:attr"), so listing components - `limner plugins`,
`limner --help`, a config's names - imports no torch; a module is imported when one of its
components is first built (start-up times: benchmarks/results/cpu-importtime.md).
"""
from limner import ComponentSpec, hookimpl

_PKG = "limner.plugins"


def _specs(module: str, entries: list) -> list[ComponentSpec]:
    """ComponentSpecs from (name, attr in `module`, aliases, description) tuples."""
    return [ComponentSpec(name, f"{_PKG}.{module}:{attr}", tuple(aliases), description)
            for name, attr, aliases, description in entries]


# The samplers, each written once: its name (plugins/samplers.py defines sample_<name>), other
# tools' names for it, and whether it also comes guided with CFG++ as <name>_cfg_pp (a sampler
# whose every step goes through limner.sampling.bind_update; the framework guides it). Lookups
# ignore case, spaces, hyphens and turn "+" into "p", so A1111's display names ("DPM++ 2M SDE",
# "Euler a") resolve too; a trailing schedule ("DPM++ 2M Karras") is split off by the pipeline.
# ComfyUI's *_gpu variants differ only in where the Brownian noise is drawn; diffusers'
# scheduler classes are named as they are spelled.
SAMPLERS = (
    ("euler", ("eulerdiscretescheduler",), True),
    ("euler_ancestral", ("euler_a", "eulerancestraldiscretescheduler"), True),
    ("heun", ("heundiscretescheduler",), False),
    ("dpm_2", ("dpm2", "kdpm2discretescheduler"), False),
    ("dpm_2_ancestral", ("dpm2_a", "kdpm2ancestraldiscretescheduler"), False),
    ("lms", ("lmsdiscretescheduler", "ipndm_v"), False),  # iPNDM-v: Adams-Bashforth with variable-step weights = lms
    ("dpmpp_2s_ancestral", ("dpmpp_2s_a",), True),
    ("dpmpp_sde", ("dpmpp_sde_gpu", "dpmsolversdescheduler"), False),
    ("dpmpp_2m", ("dpmsolvermultistepscheduler",), True),
    ("dpmpp_2m_sde", ("dpmpp_2m_sde_gpu",), False),
    ("dpmpp_3m_sde", ("dpmpp_3m_sde_gpu",), False),
    ("ddim", ("ddimscheduler",), True),
    ("ddpm", ("ddpmscheduler",), False),
    ("unipc", ("uni_pc_bh2", "unipcmultistepscheduler"), False),  # ComfyUI's uni_pc is bh1: the uni_pc sampler
    ("lcm", ("lcmscheduler",), False),
    ("deis", (), False),
    ("ipndm", (), False),
    ("res_multistep", (), True),
    ("res_multistep_ancestral", (), True),
    ("heunpp2", (), False),
    ("dpm_fast", (), False),
    ("dpm_adaptive", (), False),
    ("dpmpp_2m_sde_heun", ("dpmpp_2m_sde_heun_gpu",), False),
    ("uni_pc", (), False),
    ("gradient_estimation", (), True),
    ("er_sde", (), False),
    ("seeds_2", (), False),
    ("seeds_3", (), False),
    ("exp_heun_2_x0", (), False),
    ("exp_heun_2_x0_sde", (), False),
    ("sa_solver", (), False),
    ("sa_solver_pece", (), False),
)
SCHEDULE_NAMES = ("karras", "exponential", "polyexponential", "linear", "simple", "normal", "sgm_uniform", "beta",
                  "ddpm_linear", "ddpm_cosine", "vp", "laplace", "kl_optimal", "align_your_steps", "ddim_uniform",
                  "linear_quadratic")
SCHEDULE_ALIASES = {"align_your_steps": ("ays",)}


class samplers:
    @hookimpl
    def limner_register_samplers():
        """The k-diffusion / ComfyUI sampler family."""
        plain = [(n, f"FACTORIES.{n}", aliases, "") for n, aliases, _ in SAMPLERS]
        return _specs("samplers", plain + [(f"{n}_cfg_pp", f"FACTORIES.{n}_cfg_pp", (), "") for n, _, cfg_pp in SAMPLERS
                                           if cfg_pp])


class schedules:
    @hookimpl
    def limner_register_schedules():
        """Karras, exponential, VP, Laplace, KL-optimal, Align Your Steps, ComfyUI's and DDPM's schedules."""
        return _specs("schedules", [(n, f"FACTORIES.{n}", SCHEDULE_ALIASES.get(n, ()), "") for n in SCHEDULE_NAMES])


class datasets:
    @hookimpl
    def limner_register_datasets():
        """Digits, Fashion-MNIST and image folders."""
        return _specs("datasets", [("digits", "digits", (), ""), ("fashion_mnist", "fashion_mnist", (), ""),
                                   ("imagefolder", "ImageFolder", (), "")])


class shapes:
    @hookimpl
    def limner_register_datasets():
        """The procedurally drawn shapes dataset."""
        return _specs("shapes", [("shapes", "ShapesDataset", (), "")])

    @hookimpl
    def limner_register_metrics():
        """The shapes attribute scorer."""
        return _specs("shapes", [("shapes_attributes", "ShapesScorer", (), "")])

    @hookimpl
    def limner_register_text_encoders():
        """Shapes prompts in any words, read into the grammar by frozen language models."""
        return _specs("shapes", [("shapes_reader", "shapes_reader", (), "")])


class text_encoders:
    @hookimpl
    def limner_register_text_encoders():
        """Byte-level CLIP and BERT encoders, and the pretrained MiniLM and MPNet sentence encoders."""
        return _specs("text_encoders", [("clip_text", "clip_text", (), ""), ("bert", "bert", (), ""),
                                        ("minilm", "minilm", ("all-minilm-l6-v2",), ""),
                                        ("mpnet", "mpnet", ("all-mpnet-base-v2",), "")])


class clip:
    @hookimpl
    def limner_register_text_encoders():
        """CLIP's text transformers and BPE tokenizer: Stable Diffusion's text encoders."""
        return _specs("clip", [("clip_l", "clip_l", ("clip_vit_l",), ""), ("openclip_h", "openclip_h", (), ""),
                               ("clip_text_transformer", "clip_text_transformer", (), ""),
                               ("clip_pair", "clip_pair", ("sdxl_text",), "")])


class llama:
    @hookimpl
    def limner_register_text_encoders():
        """Decoder-only language models from GGUF files: SmolLM2, Gemma 3 270M, or any by path."""
        return _specs("llama", [("smollm2", "smollm2", ("smollm2_135m",), ""), ("gemma3_270m", "gemma3_270m", (), ""),
                                ("gguf_llm", "gguf_llm", (), "")])


class autoencoders:
    @hookimpl
    def limner_register_autoencoders():
        """Latent diffusion's KL autoencoder (Stable Diffusion's VAE)."""
        return _specs("autoencoder_kl", [("autoencoder_kl", "autoencoder_kl", ("sd_vae",), "")])


class families:
    @hookimpl
    def limner_register_families():
        """Stable Diffusion 1.x and 2.x diffusers folders."""
        return _specs("stable_diffusion", [("stable_diffusion", "stable_diffusion", ("sd",), "")])


class attention_backends:
    @hookimpl
    def limner_register_attention_backends():
        """sdpa, math, triton, xformers and limner's CPU attention."""
        return _specs("attention_backends", [(n, n, (), "") for n in ("sdpa", "math", "triton", "xformers", "cpu",
                                                                           "cpu_bf16", "cpu_f32")])


class denoisers:
    @hookimpl
    def limner_register_denoisers():
        """ADM-style UNet and DiT."""
        return _specs("denoisers", [("unet", "unet", (), ""), ("dit", "dit", (), "")]) + \
            _specs("sd_unet", [("sd_unet", "sd_unet", (), "Stable Diffusion 1.x/2.x's UNet, driven by sigmas")])


class gans:
    @hookimpl
    def limner_register_generators():
        """StyleGAN2 and DCGAN text-conditional generators."""
        return _specs("gans", [("stylegan2", "stylegan2", (), "StyleGAN2 generator, text in the mapping"),
                               ("dcgan", "dcgan", (), "DCGAN generator fed [text, noise]")])

    @hookimpl
    def limner_register_discriminators():
        """StyleGAN2 residual and projection discriminators."""
        return _specs("gans", [
            ("stylegan2", "stylegan2_discriminator", (), "StyleGAN2 residual discriminator with text projection"),
            ("projection", "projection", (), "SN-ResNet projection discriminator")])


class vae:
    @hookimpl
    def limner_register_generators():
        """The conditional VAE."""
        return _specs("vae", [("vae", "vae", (), "conditional VAE, spatial latent")])


class losses:
    @hookimpl
    def limner_register_losses():
        """GAN objectives and penalties, and the VAE's ELBO."""
        return _specs("losses", [
            ("nonsaturating", "NonSaturating", ("ns", "softplus"), "GAN: softplus"),
            ("hinge", "Hinge", (), "GAN: hinge"),
            ("wgan", "Wasserstein", (), "GAN: Wasserstein critic"),
            ("r1", "r1", (), "penalty: R1 on real images"),
            ("wgan_gp", "wgan_gp", (), "penalty: WGAN-GP"),
            ("matching_aware", "matching_aware", (), "penalty: wrong caption is fake"),
            ("elbo", "elbo", (), "VAE: negative ELBO with KL warm-up")])


class image_metrics:
    @hookimpl
    def limner_register_metrics():
        """PSNR, SSIM, MS-SSIM, FID, KID and Inception Score on torchmetrics; class agreement."""
        return _specs("image_metrics", [(n, n, (), "") for n in ("psnr", "ssim", "ms_ssim", "fid", "kid",
                                                                   "inception_score", "class_agreement")])

    @hookimpl
    def limner_register_feature_networks():
        """limner's Fashion-MNIST classifier as features for FID/KID/IS."""
        return _specs("image_metrics", [("fashion_net", "fashion_net", (), "")])

    @hookimpl
    def limner_register_recipes():
        """Feature-network training on limner's loop."""
        return _specs("image_metrics", [("feature_net", "feature_net_recipe", (), "")])


class captioners:
    @hookimpl
    def limner_register_captioners():
        """Show-attend-tell captioners (shipped for shapes and Fashion-MNIST) and language-model ones, from folders."""
        return _specs("captioners", [("shapes", "shapes", (), ""), ("fashion_mnist", "fashion_mnist", ("fashion",), ""),
                                     ("show_attend_tell", "show_attend_tell", (), ""),
                                     ("llm_prefix", "llm_prefix", ("clipcap",), "")])

    @hookimpl
    def limner_register_metrics():
        """Caption the image, compare with its prompt."""
        return _specs("captioners", [("caption_agreement", "caption_agreement", (), "")])

    @hookimpl
    def limner_register_recipes():
        """Captioner training on limner's loop."""
        return _specs("captioners", [("captioner", "captioner_recipe", (), "")])


class matching:
    @hookimpl
    def limner_register_metrics():
        """Image-text matching with limner's contrastive model (the offline CLIP score)."""
        return _specs("matching", [("matching_score", "matching_score", (), "")])

    @hookimpl
    def limner_register_recipes():
        """Matcher training on limner's loop."""
        return _specs("matching", [("matcher", "matcher_recipe", (), "")])


class recipes:
    @hookimpl
    def limner_register_recipes():
        """Diffusion (and its autoencoder), GAN and VAE training."""
        return _specs("diffusion_recipe", [("diffusion", "diffusion", (), "")]) + \
            _specs("autoencoder_recipe", [("autoencoder", "autoencoder_recipe", (), "")]) + \
            _specs("generator_recipes", [(n, n, (), "") for n in ("gan", "vae")])


PLUGINS = (samplers, schedules, datasets, shapes, text_encoders, clip, llama, autoencoders, families,
           attention_backends, denoisers, gans, vae, losses, image_metrics, captioners, matching, recipes)
