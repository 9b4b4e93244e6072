"""Image-quality metrics on torchmetrics, and limner's own feature network for them.

`psnr`, `ssim` and `ms_ssim` compare generated images with reference images (the held-out
images of the same prompts); `fid`, `kid` and `inception_score` compare feature statistics.
No Inception weights can be had offline, so the features are those of `fashion_net`, a small
classifier limner trains on Fashion-MNIST and ships (plugins/weights/fashion_net.safetensors,
its test accuracy in benchmarks/results/fashion-net.json): these are "FID with limner's
Fashion-MNIST features", comparable with each other and with the real-vs-real baseline, never
with Inception FIDs. A plugin can register Inception or CLIP features as another
`feature_networks` component where a user has the weights; the metrics take its name.

Every metric is metric(images, prompts, references=None) -> dict of floats; images and
references are [N, C, H, W] in [-1, 1]. The feature network is trained, and its real-vs-real
baselines measured, by `limner train configs/feature-nets/fashion-net.toml` (the `feature_net`
recipe on limner's one loop; its eval.json is benchmarks/results/fashion-net.json's kind).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import limner
from limner.checkpoint import write_weights
from limner.config import bounded
from limner.recipes import Recipe
from limner.train import DataConfig, LoopConfig, RunConfig, TrainerBase, step_generator
from limner.words import named_class

WEIGHTS = Path(__file__).parent / "weights" / "fashion_net.safetensors"
MEAN, STD = 0.286, 0.353  # Fashion-MNIST's pixel mean and std, in [0, 1]


class FashionNet(nn.Module):
    """A small CNN for 28x28 grey images: 3x3 convolutions 32-32 / 64-64 / 128 with max-pools,
    global average pool to 128 features, a linear layer to the 10 classes. Any [N, C, H, W] in
    [0, 1] is turned grey (channel mean) and resized to 28x28 first."""

    num_classes = 10
    num_features = 128
    classes = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")

    def __init__(self):
        super().__init__()

        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU())

        self.body = nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, 64), conv(64, 64),
                                  nn.MaxPool2d(2), conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, self.num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise limner.LimnerError(f"fashion_net takes [N, 1 or 3, H, W] images, got {tuple(images.shape)}")
        x = images.float().mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return (x - MEAN) / STD

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class FeatureOutput(nn.Module):
    """A FashionNet seen by torchmetrics: features or logits of images in [0, 1]."""

    def __init__(self, net: FashionNet, output: str):
        super().__init__()
        self.net, self.output = net, output
        self.num_features = net.num_features if output == "features" else net.num_classes
        self.classes = net.classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images) if self.output == "features" else self.net(images)


def load_fashion_net(path: str | Path | None = None) -> FashionNet:
    from safetensors.torch import load_file

    file = Path(path) if path else WEIGHTS
    if not file.is_file():
        raise limner.LimnerError(f"fashion_net: no weights at {file}; train them with "
                                 "`limner train configs/feature-nets/fashion-net.toml` (needs dataset-fashion-mnist)")
    net = FashionNet()
    net.load_state_dict(load_file(file))
    return net.eval().requires_grad_(False)


def fashion_net(output: str = "features", path: str | None = None) -> FeatureOutput:
    """limner's Fashion-MNIST classifier (shipped weights) as a feature network: its 128
    pooled features (`output = "features"`, for FID/KID) or its class logits ("logits", for IS)."""
    if output not in ("features", "logits"):
        raise limner.LimnerError(f"fashion_net: output must be features or logits, got {output!r}")
    return FeatureOutput(load_fashion_net(path), output)


# --- metrics --------------------------------------------------------------------------------

def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def _references(name: str, images: torch.Tensor, references: torch.Tensor | None) -> torch.Tensor:
    if references is None:
        raise limner.LimnerError(f"{name} compares each image with a reference image: give references (limner eval "
                                 "passes the held-out images of the same prompts)")
    if references.shape != images.shape:
        raise limner.LimnerError(f"{name}: references are {tuple(references.shape)}, images {tuple(images.shape)}")
    return _unit(references)


def psnr(data_range: float = 1.0):
    """Peak signal-to-noise ratio, 10 log10(range^2 / MSE), over the whole set (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    def metric(images, prompts=None, references=None):
        ref = _references("psnr", images, references)
        return {"psnr": float(peak_signal_noise_ratio(_unit(images), ref, data_range=data_range))}

    return metric


def ssim(kernel_size: int = 11, sigma: float = 1.5):
    """Structural similarity (Wang et al. 2004), Gaussian window, mean over images (torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def metric(images, prompts=None, references=None):
        ref = _references("ssim", images, references)
        if min(images.shape[-2:]) < kernel_size:
            raise limner.LimnerError(f"ssim: images of {tuple(images.shape[-2:])} are smaller than its "
                                     f"{kernel_size}-pixel window")
        value = structural_similarity_index_measure(_unit(images), ref, kernel_size=kernel_size, sigma=sigma,
                                                    data_range=1.0)
        return {"ssim": float(value)}

    return metric


def ms_ssim(kernel_size: int = 3, sigma: float = 0.5, scales: int = 3):
    """Multi-scale SSIM (Wang et al. 2003) over `scales` scales, with the paper's weights
    renormalised to them (torchmetrics); the image must stay larger than the window at the
    coarsest scale (32 px: 3 scales of a 3-pixel window)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales]

    def metric(images, prompts=None, references=None):
        ref = _references("ms_ssim", images, references)
        need = (kernel_size - 1) * 2 ** (scales - 1) + 1
        if min(images.shape[-2:]) <= need:
            raise limner.LimnerError(f"ms_ssim: images of {tuple(images.shape[-2:])} are too small for {scales} "
                                     f"scales of a {kernel_size}-pixel window (need more than {need} pixels)")
        total = sum(weights)
        value = multiscale_structural_similarity_index_measure(
            _unit(images), ref, kernel_size=kernel_size, sigma=sigma, data_range=1.0,
            betas=tuple(w / total for w in weights))
        return {"ms_ssim": float(value)}

    return metric


def _feature_net(features: str, output: str, path: str | None = None) -> nn.Module:
    options = {"output": output, **({"path": path} if path else {})}
    return limner.create("feature_networks", features, **options)


def fid(features: str = "fashion_net", path: str | None = None):
    """Frechet distance between Gaussian fits of real and generated features (Heusel et al.
    2017), torchmetrics' implementation, with `features` from a feature network by name
    (`path`: its weights file, for one that takes one)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    def metric(images, prompts=None, references=None):
        ref = _references("fid", images, references)
        net = _feature_net(features, "features", path)
        if len(images) < 2:
            raise limner.LimnerError(f"fid needs at least 2 images per set, got {len(images)}")
        value = FrechetInceptionDistance(feature=net, normalize=True)
        value.update(ref, real=True)
        value.update(_unit(images), real=False)
        return {f"fid_{features}": float(value.compute())}

    return metric


def kid(features: str = "fashion_net", subsets: int = 20, subset_size: int = 100, seed: int = 0,
        path: str | None = None):
    """Kernel distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel,
    mean and std over random subsets (seeded), torchmetrics' implementation."""
    from torchmetrics.image.kid import KernelInceptionDistance

    def metric(images, prompts=None, references=None):
        ref = _references("kid", images, references)
        size = min(subset_size, len(images))
        if size < 2:
            raise limner.LimnerError(f"kid needs at least 2 images per set, got {len(images)}")
        value = KernelInceptionDistance(feature=_feature_net(features, "features", path), subsets=subsets,
                                        subset_size=size, normalize=True)
        value.update(ref, real=True)
        value.update(_unit(images), real=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            mean, std = value.compute()
        return {f"kid_{features}": float(mean), f"kid_{features}_std": float(std)}

    return metric


def inception_score(features: str = "fashion_net", splits: int = 1, path: str | None = None):
    """exp(E KL(p(y|x) || p(y))) of a classifier's predictions (Salimans et al. 2016),
    torchmetrics' implementation; 1 for a one-class set, the class count at most."""
    from torchmetrics.image.inception import InceptionScore

    def metric(images, prompts=None, references=None):
        value = InceptionScore(feature=_feature_net(features, "logits", path), splits=splits, normalize=True)
        value.update(_unit(images))
        mean, _ = value.compute()
        return {f"inception_score_{features}": float(mean)}

    return metric


def class_agreement(features: str = "fashion_net", path: str | None = None):
    """The fraction of images a feature network's classifier assigns to the class its prompt
    names ("a photo of a sneaker" -> sneaker; the longest class name found as a word, a plural
    "s" allowed): a text-to-image model's prompt following on a labelled dataset."""

    def metric(images, prompts):
        if len(images) != len(prompts):
            raise limner.LimnerError(f"class_agreement: {len(images)} images but {len(prompts)} prompts")
        net = _feature_net(features, "logits", path)
        classes = getattr(net, "classes", None)
        if not classes:
            raise limner.LimnerError(f"class_agreement needs a feature network with class names; {features} has none")
        wanted = [prompt_class(p, classes) for p in prompts]
        with torch.no_grad():
            predicted = torch.cat([net(_unit(images[i:i + 500])).argmax(1) for i in range(0, len(images), 500)])
        return {f"class_agreement_{features}": float((predicted == torch.tensor(wanted)).float().mean())}

    return metric


def prompt_class(prompt: str, classes: tuple[str, ...]) -> int:
    """The index of the longest class name in the prompt, as a word ('t-shirt' before 'shirt')."""
    found = named_class(prompt, classes)
    if found is not None:
        return found
    raise limner.LimnerError(f"class_agreement: the prompt {prompt!r} names none of the classes "
                             f"{', '.join(classes)}")


# --- training the feature network: the `feature_net` recipe on limner's one loop ------------

def accuracy(net: FashionNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    with torch.no_grad():
        right = sum(int((net(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                    for i in range(0, len(images), batch))
    return right / len(images)


def fashion_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images [N, 1, 28, 28] in [0, 1] and labels, from the fashion_mnist dataset."""
    data = limner.create("datasets", "fashion_mnist", split=split, size=None)
    return torch.tensor(data.images, dtype=torch.float32)[:, None], torch.tensor(data.labels, dtype=torch.long)


@dataclass
class FeatureNetModelConfig:
    """[model]: FashionNet has a fixed shape (28x28 grey in, 128 features, its 10 classes)."""


@dataclass(kw_only=True)
class FeatureNetOptimConfig(LoopConfig):
    """[train]: the loop's settings, Adam with a one-cycle schedule, left-right flips."""

    lr: float = bounded(2e-3, gt=0)  # the one cycle's peak
    flip: bool = True  # clothes are symmetric enough


@dataclass(kw_only=True)
class FeatureNetRunConfig(RunConfig):
    """A feature-network run (recipe = "feature_net"): captions name the class ("a photo of a
    coat"); [eval] dataset is the test split it is scored on."""

    data: DataConfig = field(default_factory=DataConfig)
    model: FeatureNetModelConfig = field(default_factory=FeatureNetModelConfig)
    train: FeatureNetOptimConfig = field(default_factory=FeatureNetOptimConfig)


def one_cycle(step: int, steps: int, peak: float) -> tuple[float, float]:
    """(learning rate, Adam's beta1) of a one-cycle schedule (Smith & Topin 2019), as torch's
    OneCycleLR defaults have it: 30% of the steps from peak/25 up to the peak with beta1 falling
    0.95 -> 0.85, then down to peak/25e4 with beta1 rising back; cosine in both phases."""
    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))

    turn = 0.3 * steps - 1
    if step <= turn:
        pct = step / turn if turn > 0 else 1.0
        return anneal(peak / 25, peak, pct), anneal(0.95, 0.85, pct)
    pct = min((step - turn) / max(steps - 1 - turn, 1e-9), 1.0)
    return anneal(peak, peak / 25 / 1e4, pct), anneal(0.85, 0.95, pct)


class FeatureNetTrainer(TrainerBase):
    """Cross-entropy on the class each caption names; at the end the weights file, its test
    accuracy and the real-vs-real FID/KID/IS baselines."""

    def __init__(self, cfg: FeatureNetRunConfig):
        self.setup(cfg)
        self.net = FashionNet()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.train.lr)
        self.opts = {"net": self.opt}
        self.setup_data()

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def check(self) -> None:
        self._test_split()

    def _test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        spec = dict(self.cfg.eval.dataset)
        if "name" not in spec:
            raise limner.LimnerError("[eval] dataset: name the test split the network is scored on, e.g. "
                                     "{ name = \"fashion_mnist\", size = 28, split = \"test\" }")
        data = limner.create("datasets", spec.pop("name"), **spec)
        items = [data[i] for i in range(len(data))]
        labels = torch.tensor([prompt_class(text, FashionNet.classes) for _, text in items])
        return torch.stack([image for image, _ in items]), labels

    def before_fit(self) -> None:
        self.net.train()

    def train_step(self, images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
        t = self.cfg.train
        gen = step_generator(self.cfg.seed, self.step, self.acc.process_index)
        labels = torch.tensor([prompt_class(text, FashionNet.classes) for text in captions])
        x = (images + 1) / 2  # FashionNet reads [0, 1]
        if t.flip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        lr, beta1 = one_cycle(self.step, t.steps, t.lr)
        for group in self.opt.param_groups:
            group["lr"], group["betas"] = lr, (beta1, group["betas"][1])
        loss = F.cross_entropy(self.net(x), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        if not self.guarded_step(self.opt, list(self.net.parameters()), value, 0.0):
            return None
        return {"loss": value}

    def finish(self) -> dict:
        """out/fashion_net.safetensors, its test accuracy and the real-vs-real baselines."""
        path = self.out / "fashion_net.safetensors"
        self.net.eval()
        write_weights(path, self.net.state_dict())
        images, labels = self._test_split()
        return {"test_accuracy": accuracy(load_fashion_net(path), (images + 1) / 2, labels), "steps": self.step,
                "train_seconds": round(self.train_seconds(), 1),
                "parameters": sum(p.numel() for p in self.net.parameters()), "seed": self.cfg.seed,
                "baselines": baselines((images + 1) / 2, path)}


def feature_net_recipe() -> Recipe:
    """Train limner's Fashion-MNIST feature network (`fid`, `kid`, ... take `path = RUN/fashion_net.safetensors`)."""
    return Recipe(config=FeatureNetRunConfig, trainer=FeatureNetTrainer, model=lambda cfg: FashionNet(),
                  pipeline=None, outputs=frozenset({"fashion_net.safetensors"}))


def baselines(test_images: torch.Tensor, weights: Path = WEIGHTS) -> dict:
    """What FID/KID/IS read like on real data: the test split's two halves (a shuffled, seeded
    cut) against each other, and the IS of the whole split - the yardsticks for generated sets."""
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))
    half = len(order) // 2
    a, b = test_images[order[:half]] * 2 - 1, test_images[order[half:2 * half]] * 2 - 1
    path = str(weights)
    return {"images_per_half": half,
            **fid(path=path)(a, references=b), **kid(path=path)(a, references=b),
            **inception_score(path=path)(test_images * 2 - 1)}
