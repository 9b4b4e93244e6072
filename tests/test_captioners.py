"""Image -> text: the `captioners` kind, the shipped captioners, `caption_agreement` and
`limner caption`."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_cli import run

import limner
from limner.plugins.captioners import WEIGHTS, agreement, evaluate, read_config, train
from limner.plugins.image_metrics import WEIGHTS as FASHION_NET


def renders(n, **options):
    data = limner.create("datasets", "shapes", size=32, split="test", length=n, **options)
    pairs = [data[i] for i in range(n)]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def test_agreement_on_hand_checked_captions():
    two = "a red circle at the top and a small blue square at the left"
    swapped = "a small blue square at the left and a red circle at the top"
    one_wrong = "a red circle at the top and a blue square at the left"  # size lost
    scores = agreement([swapped, one_wrong, "a red circle at the top"], [two, two, two])
    assert scores["caption_agreement"] == pytest.approx(1 / 3)  # clause order does not matter, a lost word does
    # clause F1: 1, 1/2 (one of two clauses right in both), 2*1/(1+2) = 2/3
    assert scores["caption_clause_f1"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    classes = ("t-shirt", "shirt", "ankle boot")
    by_class = agreement(["a photo of a t-shirt", "a shirt", "a boot"], ["a t-shirt", "a photo of a t-shirt",
                                                                        "an ankle boot"], classes)
    assert by_class["caption_agreement"] == pytest.approx(1 / 3)  # 'shirt' is not 't-shirt'; 'boot' names no class
    with pytest.raises(limner.LimnerError, match="names none of the captioner's classes"):
        agreement(["a coat"], ["a hat"], classes)
    with pytest.raises(limner.LimnerError, match="2 captions but 1 prompts"):
        agreement(["a", "b"], ["a"])


def test_a_captioner_learns_class_words_in_a_short_cpu_run(tmp_path):
    if not FASHION_NET.is_file():
        pytest.skip("needs dataset-fashion-mnist")
    config = tmp_path / "c.toml"
    config.write_text(
        f'out = "{tmp_path / "cap"}"\nseed = 0\n[data]\n'
        'dataset = { name = "fashion_mnist", size = 28, channels = 1 }\nitems = 3000\nbatch_size = 32\n'
        "[model]\nchannels = 16\ndim = 64\nlayers = 1\n"
        'classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", '
        '"ankle boot"]\n[train]\nsteps = 200\nlr = 3e-3\nwarmup = 20\n'
        '[eval]\ndataset = { name = "fashion_mnist", size = 28, channels = 1, split = "test" }\n'
    )
    try:
        scores = train(config)
    except limner.LimnerError as exc:
        pytest.skip(str(exc))
    assert scores["class_word"] > 0.5  # chance: 0.1
    meta = json.loads((tmp_path / "cap" / "captioner.json").read_text())
    assert meta["captioner"] == "show_attend_tell" and meta["scores"] == scores
    # the folder loads by path, through the component its captioner.json names
    again = limner.load_captioner(tmp_path / "cap")
    assert again.classes[-1] == "ankle boot" and again.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]


def test_shipped_shapes_captioner_reproduces_its_recorded_score_and_reads_two_objects():
    model = limner.create("captioners", "shapes")
    data = limner.create("datasets", "shapes", size=32, split="test", max_objects=1, length=1000)
    images = torch.stack([((data[i][0] + 1) * 127.5).round().to(torch.uint8) for i in range(1000)])
    scores = evaluate(model, images, [data[i][1] for i in range(1000)])
    assert scores["exact_match"] == model.scores["exact_match"] >= 0.9  # the target
    pictures, truths = renders(100, min_objects=2, max_objects=2)
    said = model.caption(pictures)
    assert agreement(said, truths)["caption_clause_f1"] > 0.6  # most objects of two-object scenes are right


def test_caption_agreement_closes_the_loop_and_picks_the_captioner_that_knows_the_words():
    metric = limner.create("metrics", "caption_agreement")
    images, prompts = renders(60)
    right = metric(images, prompts)["caption_agreement"]
    wrong = metric(images, prompts[1:] + prompts[:1])["caption_agreement"]
    assert right > 0.85 and wrong < 0.1
    with pytest.raises(limner.LimnerError, match="no registered captioner knows these prompts' words"):
        metric(images[:1], ["a zebra in the snow"])
    shapes_only = limner.create("metrics", "caption_agreement", captioner="shapes")
    with pytest.raises(limner.LimnerError, match="never saw the words .*photo"):
        shapes_only(images[:1], ["a photo of a coat"])
    grey = torch.zeros(2, 1, 28, 28)  # Fashion-MNIST prompts go to the fashion captioner
    assert set(metric(grey, ["a coat", "a photo of a bag"])) == {"caption_agreement", "caption_clause_f1"}


def test_limner_caption_command(capsys, tmp_path):
    images, prompts = renders(3)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(files[-1])
    code, out, _ = run(capsys, "caption", *map(str, files), "--model", "shapes")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(f) for f in files]
    assert sum(line.split(": ", 1)[1] == p for line, p in zip(lines, prompts)) >= 2
    code, out, _ = run(capsys, "caption", str(files[0]), "--model", str(WEIGHTS / "captioner-shapes"), "--json")
    assert code == 0 and list(json.loads(out)) == [str(files[0])]
    code, _, err = run(capsys, "caption", str(files[0]), "--model", "shapez")
    assert code == 1 and "shapez" in err and "shapes" in err and "Traceback" not in err
    code, _, err = run(capsys, "caption", str(files[0]), "--model", str(tmp_path))
    assert code == 1 and "not a captioner folder" in err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "caption", str(tmp_path / "bad.png"), "--model", "shapes")
    assert code == 1 and "cannot read image" in err


@pytest.mark.parametrize("name", ["shapes", "fashion-mnist"])
def test_shipped_captioner_configs_are_valid_and_name_their_folders(name):
    root = Path(__file__).resolve().parents[1]
    cfg = read_config(root / "configs" / "captioners" / f"{name}.toml")
    assert (root / cfg["out"] / "captioner.json").is_file()
    meta = json.loads((root / cfg["out"] / "captioner.json").read_text())
    assert meta["config"] == f"configs/captioners/{name}.toml"


def test_captioner_config_mistakes_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'out = "x"\n[data]\ndataset = { name = "shapes" }\nbatchsize = 4\n[train]\nsteps = 1\n'
        '[eval]\ndataset = { name = "shapes" }\n'
    )
    with pytest.raises(
        limner.LimnerError, match="\\[data\\] unknown key 'batchsize'; valid: batch_size, dataset, items"
    ):
        read_config(bad)
    bad.write_text('out = "x"\n[data]\ndataset = { name = "shapez" }\n[train]\nsteps = 1\n[eval]\ndataset = "shapes"\n')
    with pytest.raises(limner.LimnerError, match="\\[data\\] dataset must be .* naming one of .*shapes"):
        read_config(bad)
    bad.write_text('out = "x"\n[data]\ndataset = { name = "shapes" }\n[eval]\ndataset = { name = "shapes" }\n')
    with pytest.raises(limner.LimnerError, match="needs train"):
        read_config(bad)
