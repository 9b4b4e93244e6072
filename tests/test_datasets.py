"""Datasets and the shapes attribute scorer."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import limner
from limner.plugins.shapes import ShapeObject, caption, parse_caption, render


def test_shapes_is_seeded_and_captions_follow_the_grammar():
    a = limner.create("datasets", "shapes", length=50)
    b = limner.create("datasets", "shapes", length=50)
    test = limner.create("datasets", "shapes", length=50, split="test")
    img, text = a[7]
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
    assert torch.equal(img, b[7][0]) and text == b[7][1]
    assert [a[i][1] for i in range(50)] != [test[i][1] for i in range(50)]
    for i in range(50):
        objects = parse_caption(a[i][1])
        assert caption(objects) == a[i][1]
        assert len({o.colour for o in objects}) == len(objects) == len({o.position for o in objects})


def test_shapes_min_objects_picks_scenes_of_that_many_and_keeps_one_object_scenes_as_they_were():
    two = limner.create("datasets", "shapes", length=40, max_objects=2, min_objects=2, split="test")
    assert all(len(parse_caption(two[i][1])) == 2 for i in range(40))
    mixed = limner.create("datasets", "shapes", length=40, max_objects=2, split="test")
    counts = {len(parse_caption(mixed[i][1])) for i in range(40)}
    assert counts == {1, 2}
    with pytest.raises(limner.LimnerError, match="min_objects must be 1..max_objects \\(2\\), got 3"):
        limner.create("datasets", "shapes", max_objects=2, min_objects=3)


def test_shapes_scorer_reads_every_dataset_image():
    ds = limner.create("datasets", "shapes", length=300, split="test")
    images, prompts = zip(*(ds[i] for i in range(300)))
    scores = limner.create("metrics", "shapes_attributes")(torch.stack(images), list(prompts))
    assert scores["objects"] > 300
    assert scores["colour"] == scores["shape"] == scores["position"] == scores["all"] == 1.0


@pytest.mark.parametrize("drawn, prompt, wrong", [
    ("a red circle at the top left", "a green circle at the top left", {"colour", "shape", "position"}),
    ("a red circle at the top left", "a red square at the top left", {"shape"}),
    ("a red triangle at the top left", "a red circle at the top left", {"shape"}),
    ("a large red circle at the top left", "a large red circle at the bottom right", {"position"}),
    ("a blue square at the center and a white triangle at the right",
     "a blue square at the center and a white triangle at the left", {"position"}),
])
def test_shapes_scorer_catches_each_wrong_attribute(drawn, prompt, wrong):
    image = render(parse_caption(drawn), 32)
    result = limner.create("metrics", "shapes_attributes").check(image, prompt)
    assert {k for r in result for k, ok in r.items() if not ok} == wrong


def test_shapes_scorer_tolerates_noise_and_blur():
    # A 3x3 box blur rounds a 6-pixel small square into a circle, so blur only bigger ones.
    objects = [ShapeObject("", "yellow", "triangle", "bottom left"), ShapeObject("large", "purple", "square", "top")]
    blurred = torch.nn.functional.avg_pool2d(render(objects, 32)[None], 3, stride=1, padding=1,
                                             count_include_pad=False)[0]
    small = [ShapeObject("small", "green", "square", "right"), ShapeObject("small", "white", "triangle", "top")]
    scorer = limner.create("metrics", "shapes_attributes")
    for objs, image in ((objects, blurred), (small, render(small, 32))):
        right = [all(r.values()) for seed in range(20) for r in scorer.check(
            image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)), caption(objs))]
        assert sum(right) / len(right) >= 0.9  # measured: 38/40 and 40/40


def test_shapes_errors_name_the_problem():
    scorer = limner.create("metrics", "shapes_attributes")
    with pytest.raises(limner.LimnerError, match="cannot read 'a red hexagon at the top'"):
        scorer.check(torch.zeros(3, 32, 32), "a red hexagon at the top")
    with pytest.raises(limner.LimnerError, match=r"expects \[3, H, W\] images, got \(1, 32, 32\)"):
        scorer.check(torch.zeros(1, 32, 32), "a red circle at the top")
    with pytest.raises(limner.LimnerError, match="size must be >= 32 pixels, got 16"):
        limner.create("datasets", "shapes", size=16)
    with pytest.raises(limner.LimnerError, match="unknown split 'val'"):
        limner.create("datasets", "shapes", split="val")


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_digits_captions_name_the_label():
    pytest.importorskip("sklearn")
    train, test = limner.create("datasets", "digits"), limner.create("datasets", "digits", split="test", size=None)
    assert len(train) + len(test) == 1797
    img, text = train[0]
    assert img.shape == (1, 32, 32) and -1 <= img.min() < img.max() <= 1
    assert test[0][0].shape == (1, 8, 8)
    for i in range(30):
        label = int(train.labels[i])
        assert WORDS[label] in train[i][1] or str(label) in train[i][1]


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.array([9, 0, 3, 8, 1])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = limner.create("datasets", "fashion_mnist", root=str(tmp_path), split="test", size=None, channels=3)
    img, text = ds[0]
    assert img.shape == (3, 28, 28) and "ankle boot" in text
    assert torch.allclose(img[0], torch.tensor(images[0] / 255.0 * 2 - 1, dtype=torch.float32), atol=1e-6)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(limner.LimnerError, match="cannot read IDX file .*t10k-labels"):
        limner.create("datasets", "fashion_mnist", root=str(tmp_path), split="test")
    with pytest.raises(limner.LimnerError, match="apt-get install dataset-fashion-mnist"):
        limner.create("datasets", "fashion_mnist", root=str(tmp_path / "absent"))


def test_imagefolder_reads_metadata_and_sidecars(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("a blue patch\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red patch"}) + "\n")
    ds = limner.create("datasets", "imagefolder", root=str(tmp_path), size=8)
    (img_a, text_a), (img_b, text_b) = ds[0], ds[1]
    assert (text_a, text_b) == ("a red patch", "a blue patch")
    assert img_a.shape == (3, 8, 8) and img_a[0].min() > 0.95 and img_a[2].max() < -0.95
    assert img_b[2].min() > 0.95 and img_b[0].max() < -0.95


def test_imagefolder_errors_name_the_file(tmp_path):
    with pytest.raises(limner.LimnerError, match="folder not found"):
        limner.create("datasets", "imagefolder", root=str(tmp_path / "nope"))
    with pytest.raises(limner.LimnerError, match="no images"):
        limner.create("datasets", "imagefolder", root=str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(limner.LimnerError, match="no caption for .*lonely.png"):
        limner.create("datasets", "imagefolder", root=str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "lonely.png"}\n')
    with pytest.raises(limner.LimnerError, match=r"metadata.jsonl:1: expected"):
        limner.create("datasets", "imagefolder", root=str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "lonely.png", "text": "t"}\n')
    (tmp_path / "lonely.png").write_bytes(b"not a png")
    with pytest.raises(limner.LimnerError, match="cannot read image .*lonely.png"):
        limner.create("datasets", "imagefolder", root=str(tmp_path))[0]
