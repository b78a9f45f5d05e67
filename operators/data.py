"""Datasets of the default subjects, loaded offline and split train / calibration / evaluation.

Every dataset is split by seed into three disjoint parts and the split is recorded (sizes and a hash
of the indices) in every manifest built from it: operators train on ``train``, quantizers calibrate
and early-exit thresholds are chosen on ``calibration``, and accuracy is measured on ``evaluation``
only — the studies calibrated and tuned on the evaluation set; tierlab never does.

Sources: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
fortunes from Debian's ``fortunes`` (``/usr/share/games/fortunes``), and any folder of images with one
sub-folder per class for bring-your-own models. A missing source raises :class:`DatasetMissing`
saying how to get it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path(os.environ.get("TIERLAB_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FORTUNES_DIR = Path(os.environ.get("TIERLAB_FORTUNES", "/usr/share/games/fortunes"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
# eight topics of the Debian fortunes that read as different subjects, not different tones
FORTUNE_CATEGORIES = ("computers", "science", "politics", "work", "food", "law", "education", "sports")


# texts → {ONNX input name: int64 array}, e.g. a tokenizer's input_ids and attention_mask
TokenizeFn = Callable[[Sequence[str]], dict[str, np.ndarray]]


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Samples:
    """Model inputs (by ONNX input name) and targets, row-aligned."""

    inputs: dict[str, np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: np.ndarray | slice) -> Samples:
        return Samples({k: v[index] for k, v in self.inputs.items()}, self.targets[index])

    def head(self, count: int) -> Samples:
        return self.take(slice(0, min(count, len(self))))


@dataclass(frozen=True)
class SplitData:
    train: Samples
    calibration: Samples
    evaluation: Samples
    record: dict[str, str | int] = field(default_factory=dict)


def split_indices(count: int, seed: int, fractions: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle ``range(count)`` by seed into train / calibration / evaluation (calibration, evaluation fractions)."""
    order = np.random.default_rng(seed).permutation(count)
    n_cal, n_eval = round(count * fractions[0]), round(count * fractions[1])
    return order[n_cal + n_eval :], order[:n_cal], order[n_cal : n_cal + n_eval]


def make_split(samples: Samples, *, seed: int, fractions: tuple[float, float], name: str) -> SplitData:
    train, calibration, evaluation = split_indices(len(samples), seed, fractions)
    digest = hashlib.sha256(b"".join(np.sort(i).astype("<i8").tobytes() for i in (train, calibration, evaluation)))
    record: dict[str, str | int] = {
        "dataset": name,
        "split_seed": seed,
        "train_n": len(train),
        "calibration_n": len(calibration),
        "evaluation_n": len(evaluation),
        "split_sha256": digest.hexdigest()[:16],
    }
    return SplitData(samples.take(train), samples.take(calibration), samples.take(evaluation), record)


# --------------------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(folder: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images (uint8, N×28×28) and labels, train and test files together."""
    files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST is not in {folder} (missing {', '.join(missing)}): install it with "
            "`apt-get install dataset-fashion-mnist`, or point TIERLAB_FASHION_MNIST at a folder holding the four "
            "*-ubyte.gz files"
        )
    train_x, train_y, test_x, test_y = (_read_idx(folder / f) for f in files)
    return np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]).astype(np.int64)


def fashion_images(images: np.ndarray) -> np.ndarray:
    """uint8 N×28×28 → float32 N×1×28×28 in [-1, 1]."""
    return (images.astype(np.float32)[:, None] / 127.5) - 1.0


def fashion_mnist_split(seed: int = 0, limit: int | None = None) -> SplitData:
    images, labels = load_fashion_mnist()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    samples = Samples({"image": fashion_images(images)}, labels)
    return make_split(samples, seed=seed, fractions=(0.05, 0.15), name="fashion-mnist")


# ------------------------------------------------------------------------------ Fashion-MNIST segmentation

SEG_CANVAS = 64
SEG_CLASSES = 11  # background + the ten Fashion-MNIST classes
_SEG_ITEM_THRESHOLD = 24


def compose_canvases(images: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` canvases of SEG_CANVAS² pixels, each holding 2 or 3 Fashion-MNIST items at random places.

    Per-pixel labels: 0 background, ``1 + class`` where an item's pixel is brighter than a threshold; a later
    item covers an earlier one. Deterministic from ``seed``.
    """
    rng = np.random.default_rng(seed)
    canvas = np.zeros((count, SEG_CANVAS, SEG_CANVAS), np.uint8)
    target = np.zeros((count, SEG_CANVAS, SEG_CANVAS), np.int64)
    for i in range(count):
        for pick in rng.integers(0, len(images), size=rng.integers(2, 4)):
            top, left = rng.integers(0, SEG_CANVAS - 28 + 1, size=2)
            item = images[pick]
            mask = item > _SEG_ITEM_THRESHOLD
            window = (slice(top, top + 28), slice(left, left + 28))
            canvas[i][window] = np.where(mask, item, canvas[i][window])
            target[i][window] = np.where(mask, labels[pick] + 1, target[i][window])
    return canvas, target


def fashion_seg_split(seed: int = 0, count: int = 6000) -> SplitData:
    images, labels = load_fashion_mnist()
    canvas, target = compose_canvases(images, labels, count, seed)
    samples = Samples({"image": fashion_images(canvas)}, target)
    return make_split(samples, seed=seed, fractions=(0.05, 0.15), name=f"fashion-mnist-seg{SEG_CANVAS}")


# ------------------------------------------------------------------------------------------- fortunes


def read_fortunes(path: Path) -> list[str]:
    """One fortune file → its entries (separated by lines holding only '%')."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = [" ".join(part.split()) for part in text.split("\n%\n")]
    return [e for e in entries if e and e != "%"]


def load_fortunes(
    folder: Path = FORTUNES_DIR, categories: Sequence[str] = FORTUNE_CATEGORIES
) -> tuple[list[str], np.ndarray]:
    missing = [c for c in categories if not (folder / c).is_file()]
    if missing:
        raise DatasetMissing(
            f"fortune categories {missing} are not in {folder}: install them with `apt-get install fortunes`, or point "
            "TIERLAB_FORTUNES at a folder of fortune files"
        )
    texts: list[str] = []
    labels: list[int] = []
    for index, category in enumerate(categories):
        entries = read_fortunes(folder / category)
        texts += entries
        labels += [index] * len(entries)
    return texts, np.asarray(labels, dtype=np.int64)


def fortunes_split(tokenize: TokenizeFn, seed: int = 0, limit: int | None = None) -> SplitData:
    texts, labels = load_fortunes()
    if limit is not None:
        keep = np.random.default_rng(seed).permutation(len(texts))[:limit]
        texts, labels = [texts[i] for i in keep], labels[keep]
    samples = Samples(tokenize(texts), labels)
    return make_split(samples, seed=seed, fractions=(0.1, 0.2), name="fortunes-8")


# -------------------------------------------------------------------------------------- image folders


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


def _read_image(
    file: Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], channels: int
) -> np.ndarray:
    """One image file → float32 C×H×W, resized to ``size`` (width, height) and normalised per channel."""
    try:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L").resize(size), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise DatasetMissing(f"{file} is not a readable image: {exc}") from None
    pixels = pixels.reshape(size[1], size[0], channels)
    normalised = (pixels - np.asarray(mean[:channels], np.float32)) / np.asarray(std[:channels], np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def class_folders(folder: Path, what: str) -> list[str]:
    """The sorted names of ``folder``'s sub-folders, one per class."""
    if not folder.is_dir():
        raise DatasetMissing(f"{what} folder {folder} does not exist")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetMissing(f"{what} folder {folder} has no class sub-folders (expected {folder}/<class>/<file>)")
    return classes


def load_image_folder(
    folder: Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], channels: int = 3
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A folder with one sub-folder per class → float32 images (N×C×H×W), labels, class names (sorted).

    Images are converted to RGB (or grey for ``channels=1``), resized to ``size`` (width, height) and
    normalised with ``mean``/``std``.
    """
    classes = class_folders(folder, "image")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for file in sorted((folder / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                arrays.append(_read_image(file, size, mean, std, channels))
                labels.append(index)
    if not arrays:
        raise DatasetMissing(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(arrays), np.asarray(labels, np.int64), classes


def load_segmentation_folder(
    folder: Path,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: int = 3,
    mask_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``folder/images/<stem>.<ext>`` with ``folder/masks/<stem>.png`` → images (N×C×H×W) and masks (N×H'×W').

    A mask's pixel values are class ids (a palette or grey PNG, as VOC and Cityscapes give them), resized
    with nearest-neighbour to ``mask_size`` (the model's output size; default ``size``).
    """
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DatasetMissing(
            f"a segmentation folder holds images/ and masks/ with matching file names; {folder} does not"
        )
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    unmatched = [p.name for p in files if p.stem not in masks]
    if unmatched or not files:
        raise DatasetMissing(
            f"{images_dir} holds no images" if not files else f"no mask in {masks_dir} for {', '.join(unmatched[:5])}"
        )
    arrays, targets = [], []
    for file in files:
        arrays.append(_read_image(file, size, mean, std, channels))
        with Image.open(masks[file.stem]) as mask:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise DatasetMissing(f"mask {masks[file.stem]} is {mask.mode}: masks hold one class id per pixel")
            targets.append(np.asarray(mask.resize(mask_size or size, Image.Resampling.NEAREST), dtype=np.int64))
    return np.stack(arrays), np.stack(targets)


def load_text_folder(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """``folder/<class>/<file>``, one text per file (scikit-learn's ``load_files`` layout, as aclImdb or
    20 Newsgroups come) → texts, labels, class names (sorted)."""
    from sklearn.datasets import load_files

    class_folders(folder, "text")
    bunch = load_files(str(folder), encoding="utf-8", decode_error="replace", shuffle=False)
    if not len(bunch.data):
        raise DatasetMissing(f"text folder {folder} holds no files")
    return [str(t).strip() for t in bunch.data], np.asarray(bunch.target, np.int64), list(bunch.target_names)


def fingerprint(split: SplitData, extra: Mapping[str, object] | None = None) -> str:
    """A short hash of a split's record, for incremental builds."""
    text = repr(sorted(split.record.items())) + repr(sorted((extra or {}).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
