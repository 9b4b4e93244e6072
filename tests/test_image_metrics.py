"""Image metrics (torchmetrics underneath) against hand-checked cases, and limner's Fashion-MNIST
feature network: its shipped weights, its accuracy, and FID/KID/IS built on it."""
import json
import math
from pathlib import Path

import pytest
import torch

import limner
from limner.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")


def metric(name, **options):
    return limner.create("metrics", name, **options)


def test_psnr_is_ten_log_range_over_mse():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01, PSNR 10 log10(1 / 0.01) = 20 dB
    assert metric("psnr")(x + 0.2, references=x)["psnr"] == pytest.approx(20.0, abs=1e-4)


def test_ssim_of_flat_images_is_its_luminance_term():
    # no variance anywhere: contrast and structure terms are C2 / C2 = 1, luminance (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.5, 0.01**2
    flat = torch.full((2, 1, 16, 16), a * 2 - 1), torch.full((2, 1, 16, 16), b * 2 - 1)
    assert metric("ssim")(flat[0], references=flat[1])["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1),
                                                                                rel=1e-4)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert metric("ssim")(x, references=x)["ssim"] == pytest.approx(1.0, abs=1e-6)
    noisy = metric("ssim")(x + 0.3 * torch.randn_like(x), references=x)["ssim"]
    assert noisy < 0.9


def test_ms_ssim_and_the_size_it_needs():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert metric("ms_ssim")(x, references=x)["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert metric("ms_ssim")((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), references=x)["ms_ssim"] < 0.95
    with pytest.raises(limner.LimnerError, match=r"ms_ssim: images of \(8, 8\) are too small for 3 scales"):
        metric("ms_ssim")(x[..., :8, :8], references=x[..., :8, :8])
    with pytest.raises(limner.LimnerError, match="psnr compares each image with a reference image"):
        metric("psnr")(x)


def test_the_shipped_feature_network_loads_and_sees_any_image_size():
    net = limner.create("feature_networks", "fashion_net")
    assert net.num_features == 128
    out = net(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 128) and torch.isfinite(out).all()
    assert limner.create("feature_networks", "fashion_net", output="logits")(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(limner.LimnerError, match="output must be features or logits"):
        limner.create("feature_networks", "fashion_net", output="probs")


def test_fid_and_kid_are_zero_for_one_set_and_grow_with_a_shift():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1
    y = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1
    fid = metric("fid")
    assert abs(fid(x, references=x)["fid_fashion_net"]) < 1e-3
    near, far = (
        fid(y, references=x)["fid_fashion_net"],
        fid((y * 0.3 + 0.6).clamp(-1, 1), references=x)["fid_fashion_net"],
    )
    assert far > near > 0
    kid = metric("kid", subset_size=32, subsets=10)
    same = kid(x, references=x)  # unbiased MMD^2 over random subsets: about 0, within its spread
    shifted = kid((y * 0.3 + 0.6).clamp(-1, 1), references=x)["kid_fashion_net"]
    assert abs(same["kid_fashion_net"]) < 2 * same["kid_fashion_net_std"] + 1e-6
    assert shifted > 10 * abs(same["kid_fashion_net"]) and shifted > kid(y, references=x)["kid_fashion_net"]
    with pytest.raises(limner.LimnerError, match="fid needs at least 2 images"):
        fid(x[:1], references=x[:1])


def test_inception_score_of_one_image_repeated_is_one():
    one = (torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1).expand(20, -1, -1, -1)
    assert metric("inception_score")(one)["inception_score_fashion_net"] == pytest.approx(1.0, abs=1e-4)


@needs_fashion
def test_the_feature_network_reaches_its_reported_accuracy_and_is_spreads_over_classes():
    from limner.plugins.image_metrics import accuracy, fashion_arrays, load_fashion_net

    images, labels = fashion_arrays("test")
    reported = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "fashion-net.json").read_text())
    acc = accuracy(load_fashion_net(), images, labels)
    assert acc >= 0.90 and acc == pytest.approx(reported["test_accuracy"], abs=1e-4)
    score = metric("inception_score")(images * 2 - 1)["inception_score_fashion_net"]
    # ten balanced classes, but shirts, t-shirts, pullovers and coats are told apart with doubt
    assert (
        score == pytest.approx(reported["baselines"]["inception_score_fashion_net"], rel=1e-3) and 3.0 < score <= 10.0
    )


def test_eval_takes_metrics_by_name_and_writes_json_and_markdown(tmp_path, capsys):
    from test_train import train, write_config

    train(write_config(tmp_path, steps=2))
    out = tmp_path / "report.json"
    main(["eval", str(tmp_path / "run"), "--prompts", "4", "--metrics", "psnr,ssim,shapes_attributes",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"psnr", "ssim", "colour", "all"} <= set(report["scores"]) and math.isfinite(report["scores"]["psnr"])
    assert "| psnr |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path / "run"), "--metrics", "fidd"])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and "unknown metric 'fidd'" in err and "Traceback" not in err


def test_prompt_class_finds_the_longest_class_name_as_a_word():
    from limner.plugins.image_metrics import FashionNet, prompt_class

    classes = FashionNet.classes
    named = {p: classes[prompt_class(p, classes)] for p in (
        "a photo of a t-shirt", "a shirt", "a pair of trousers", "a black and white picture of a ankle boot")}
    assert named == {"a photo of a t-shirt": "t-shirt", "a shirt": "shirt", "a pair of trousers": "trouser",
                     "a black and white picture of a ankle boot": "ankle boot"}
    with pytest.raises(limner.LimnerError, match="the prompt 'a red circle' names none of the classes t-shirt, "):
        metric("class_agreement")(torch.zeros(1, 1, 28, 28), ["a red circle"])


@needs_fashion
def test_class_agreement_of_real_images_with_their_own_captions_is_the_classifier_accuracy():
    from limner.plugins.image_metrics import accuracy, fashion_arrays, load_fashion_net

    data = limner.create("datasets", "fashion_mnist", size=28, split="test")
    images, prompts = zip(*(data[i] for i in range(600)))
    images = torch.stack(images)
    agreement = metric("class_agreement")(images, list(prompts))["class_agreement_fashion_net"]
    raw, labels = fashion_arrays("test")
    assert agreement == pytest.approx(accuracy(load_fashion_net(), raw[:600], labels[:600]), abs=1e-6)
    shuffled = metric("class_agreement")(images, list(prompts[1:]) + [prompts[0]])["class_agreement_fashion_net"]
    assert agreement > 0.85 and shuffled < 0.3  # another image's caption: mostly another class
