"""Captioned image datasets read from packages or local folders (never downloaded):
`digits` (scikit-learn's handwritten digits), `fashion_mnist` (Debian's
dataset-fashion-mnist package, or a folder of the IDX files) and `imagefolder`.

Every item is (image [C, H, W] in [-1, 1], caption).
"""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import limner

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten digit {word}", "the number {word}, written by hand", "a scanned digit {digit}")
FASHION_LABELS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                  "bag", "ankle boot")
FASHION_TEMPLATES = ("a photo of a {label}", "a {label}", "a black and white picture of a {label}")
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _resize(img: torch.Tensor, size: int | None) -> torch.Tensor:
    """[C, h, w] -> [C, size, size] (bilinear, antialiased); None keeps the native size."""
    if size is None or img.shape[-1] == size == img.shape[-2]:
        return img
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _split_indices(n: int, split: str, test_fraction: float = 0.2) -> np.ndarray:
    """A fixed shuffled split of range(n): the same on every machine."""
    if split not in ("train", "test"):
        raise limner.LimnerError(f"unknown split {split!r}. Valid: train, test.")
    order = np.random.default_rng(12345).permutation(n)
    cut = int(n * (1 - test_fraction))
    return order[:cut] if split == "train" else order[cut:]


class LabelledImages(torch.utils.data.Dataset):
    """Grey images with class labels, captioned by templates chosen per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, captions: list[list[str]], size: int | None,
                 channels: int):
        if channels not in (1, 3):
            raise limner.LimnerError(f"channels must be 1 or 3, got {channels}")
        self.images, self.labels, self.captions = images, labels, captions
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        img = torch.as_tensor(self.images[i], dtype=torch.float32)[None] * 2 - 1  # [1, h, w]
        img = _resize(img, self.size).clamp(-1, 1).expand(self.channels, -1, -1)
        options = self.captions[int(self.labels[i])]
        return img, options[i % len(options)]


def digits(size: int | None = 32, channels: int = 1, split: str = "train") -> LabelledImages:
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI), captioned 'a handwritten digit seven'."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise limner.LimnerError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    keep = _split_indices(len(data.images), split)
    captions = [[t.format(word=w, digit=d) for t in DIGIT_TEMPLATES] for d, w in enumerate(DIGIT_WORDS)]
    return LabelledImages(data.images[keep] / 16.0, data.target[keep], captions, size, channels)


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (LeCun's MNIST format), gzipped or not; raises naming a corrupt file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"not an unsigned-byte IDX file (header {raw[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"expected {int(np.prod(shape))} values for shape {shape}, found {body.size}")
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise limner.LimnerError(f"cannot read IDX file {path}: {exc}") from None
    return body.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise limner.LimnerError(f"fashion_mnist: {stem}[.gz] not found in {root}")


def fashion_mnist(root: str | None = None, size: int | None = 32, channels: int = 1,
                  split: str = "train") -> LabelledImages:
    """Fashion-MNIST (Xiao et al. 2017; 70,000 28x28 images, 10 classes), from Debian's
    dataset-fashion-mnist package or a folder of its IDX files; captions from templates."""
    folder = Path(root) if root else FASHION_ROOT
    if not folder.is_dir():
        raise limner.LimnerError(f"fashion_mnist: folder {folder} not found; install it with "
                                 "`apt-get install dataset-fashion-mnist` or pass root=<folder of IDX files>")
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise limner.LimnerError(f"unknown split {split!r}. Valid: train, test.")
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise limner.LimnerError(f"fashion_mnist: {len(images)} images but {len(labels)} labels in {folder}")
    captions = [[t.format(label=label) for t in FASHION_TEMPLATES] for label in FASHION_LABELS]
    return LabelledImages(images / 255.0, labels, captions, size, channels)


class ImageFolder(torch.utils.data.Dataset):
    """Images in a folder, captioned by metadata.jsonl ({"file_name": ..., "text": ...}
    per line, as Hugging Face's imagefolder) or by a sidecar .txt file per image."""

    def __init__(self, root: str, size: int = 64, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise limner.LimnerError(f"imagefolder: folder not found: {self.root}")
        if channels not in (1, 3):
            raise limner.LimnerError(f"channels must be 1 or 3, got {channels}")
        self.size, self.channels = size, channels
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise limner.LimnerError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        meta = self._metadata()
        self.items = [(p, self._caption(p, meta)) for p in files]

    def _metadata(self) -> dict[str, str]:
        path = self.root / "metadata.jsonl"
        if not path.is_file():
            return {}
        captions = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(Path(row["file_name"]))] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise limner.LimnerError(f"{path}:{n}: expected {{\"file_name\": ..., \"text\": ...}}: {exc}") from None
        return captions

    def _caption(self, image: Path, meta: dict[str, str]) -> str:
        rel = str(image.relative_to(self.root))
        if rel in meta:
            return meta[rel]
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        raise limner.LimnerError(
            f"imagefolder: no caption for {image}: add it to metadata.jsonl or write {sidecar.name}"
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path, text = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                side = min(w, h)  # centre crop to a square, then resize
                im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
                im = im.resize((self.size, self.size), Image.Resampling.BICUBIC)
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
        except (OSError, UnidentifiedImageError) as exc:
            raise limner.LimnerError(f"imagefolder: cannot read image {path}: {exc}") from None
        img = torch.from_numpy(arr)
        return (img[None] if img.ndim == 2 else img.permute(2, 0, 1)).contiguous(), text
