"""Built-in offline image sets: IDX reading, seeded stratified splits, the missing-package error, split subsets."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from mergelab.core.errors import DataError
from mergelab.data import catalog, image_sets
from mergelab.data.image_sets import load_builtin_image_task, read_idx
from mergelab.data.types import TextSplit


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), np.arange(n) % 4


def test_idx_files_read_and_bad_ones_name_the_file(tmp_path):
    images, labels = synthetic(7, 0)
    write_idx(tmp_path / "x-images.gz", images)
    write_idx(tmp_path / "x-labels.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "x-images.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "x-labels.gz"), labels)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x03junk"))
    with pytest.raises(DataError, match="bad.gz") as info:
        read_idx(tmp_path / "bad.gz")
    assert "\n" not in str(info.value)


def test_fashion_mnist_from_idx_files_and_missing_package_error(tmp_path, monkeypatch):
    monkeypatch.setattr(image_sets, "FASHION_DIR", tmp_path)
    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        load_builtin_image_task("fashion_mnist", 8, 4, 4)
    assert "apt-get install" in str(info.value) and "\n" not in str(info.value)
    for prefix, (n, seed) in {"train": (40, 1), "t10k": (12, 2)}.items():
        images, labels = synthetic(n, seed)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    task = load_builtin_image_task("fashion_mnist", train_size=16, validation_size=8, test_size=8, seed=0)
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 16, "validation": 8, "test": 8}
    assert task.label_names[0] == "T-shirt/top" and task.modality == "image"
    test_images, _ = synthetic(12, 2)
    decoded = np.asarray(task.splits["test"].image(0).convert("L"))
    assert any(np.array_equal(decoded, img) for img in test_images)  # test comes from the t10k file


def test_one_set_splits_are_stratified_disjoint_and_seeded(monkeypatch):
    images, labels = synthetic(80, 3)
    images[:, 0, 0] = np.arange(80)  # every image unique, so overlaps would show
    monkeypatch.setitem(image_sets.BUILTIN_IMAGE, "mnist", (lambda: ((images, labels), None, list("abcd")), "synthetic"))
    task = load_builtin_image_task("mnist", train_size=40, validation_size=12, test_size=20, seed=5)
    seen = {s: {v.sources[i] for i in range(len(v))} for s, v in task.splits.items()}
    assert {s: len(v) for s, v in seen.items()} == {"train": 40, "validation": 12, "test": 20}
    assert not (seen["train"] & seen["test"]) and not (seen["validation"] & seen["test"])
    assert not (seen["train"] & seen["validation"])
    assert np.bincount(task.splits["test"].labels).tolist() == [5, 5, 5, 5]
    again = load_builtin_image_task("mnist", train_size=40, validation_size=12, test_size=20, seed=5)
    other = load_builtin_image_task("mnist", train_size=40, validation_size=12, test_size=20, seed=6)
    assert again.content_hash() == task.content_hash() != other.content_hash()
    assert task.provenance["sizes"] == {"train": 40, "validation": 12, "test": 20}


def test_digits_are_built_in_and_in_the_catalog():
    assert {"mnist", "fashion_mnist", "digits"} <= set(catalog.builtin_task_names())
    task = catalog.load_builtin_task("digits", train_size=50, validation_size=20, test_size=30)
    assert task.num_classes == 10 and task.splits["train"].image(0).size == (8, 8)
    assert max(np.asarray(task.splits["train"].image(i).convert("L")).max() for i in range(10)) > 200  # 0-16 → 0-255


def test_split_subsets_keep_order_and_names():
    text = TextSplit(["a", "b", "c"], [0, 1, 0]).subset([2, 0])
    assert text.texts == ["c", "a"] and text.labels == [0, 0]
    images, labels = synthetic(6, 4)
    split = image_sets.array_split("s", "train", images, labels, np.arange(6))
    sub = split.subset([4, 1])
    assert sub.labels == [int(labels[4]), int(labels[1])] and sub.names == ["s train image 4", "s train image 1"]
    assert np.array_equal(np.asarray(sub.image(0).convert("L")), images[4])
