"""Image tasks: class folders, path,label tables and saved DatasetDicts; bad inputs are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mergelab.core.errors import DataError
from mergelab.data.images import is_image_task_folder, load_image_task


def write_image(path: Path, seed: int, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def class_folders(root: Path, classes=("cat", "dog"), per_class: int = 3, splits=("train", "test")) -> Path:
    seed = 0
    for split in splits:
        for name in classes:
            for i in range(per_class):
                seed += 1
                write_image(root / split / name / f"{i}.png", seed)
    return root


def test_class_folders_load_lazily_with_sorted_classes(tmp_path):
    root = class_folders(tmp_path / "pets", classes=("dog", "cat"), splits=("train", "val", "test"))
    task = load_image_task("pets", root)
    assert task.label_names == ["cat", "dog"] and set(task.splits) == {"train", "validation", "test"}
    train = task.splits["train"]
    assert len(train) == 6 and train.labels == [0, 0, 0, 1, 1, 1]
    image = train.image(4)
    assert image.mode == "RGB" and image.size == (12, 12)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(root / "train" / "dog" / "1.png")))
    assert is_image_task_folder(root)


def test_content_hash_follows_the_bytes_not_the_place(tmp_path):
    first = load_image_task("a", class_folders(tmp_path / "a"))
    second = load_image_task("a", class_folders(tmp_path / "b"))
    assert first.content_hash() == second.content_hash()
    write_image(tmp_path / "b" / "test" / "cat" / "0.png", seed=999)
    assert load_image_task("a", tmp_path / "b").content_hash() != first.content_hash()


def test_path_label_tables(tmp_path):
    root = tmp_path / "table"
    rows = {"train": [("img/a0.png", "ship"), ("img/a1.png", "plane"), ("img/a2.png", "ship")],
            "test": [("img/b0.png", "plane")]}  # fmt: skip
    for split, items in rows.items():
        for seed, (rel, _) in enumerate(items):
            write_image(root / rel, seed + (10 if split == "test" else 0))
        (root / f"{split}.csv").write_text("path,label\n" + "\n".join(f"{p},{y}" for p, y in items) + "\n")
    task = load_image_task("vehicles", root)
    assert task.label_names == ["plane", "ship"] and task.splits["train"].labels == [1, 0, 1]
    assert is_image_task_folder(root)
    (root / "test.csv").write_text("path,label\nimg/b0.png,boat\n")
    with pytest.raises(DataError, match=r"has label\(s\) \['boat'\] that train lacks"):
        load_image_task("vehicles", root)
    (root / "test.csv").write_text("path,label\nimg/missing.png,ship\n")
    with pytest.raises(DataError, match=r"do not exist, e.g. .*img/missing.png"):
        load_image_task("vehicles", root)


def test_saved_dataset_dict_with_an_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (0, 80, 160, 240)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    part = {"image": images, "label": [0, 0, 1, 1]}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(part, features=features) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "dd"))
    task = load_image_task("shade", tmp_path / "dd")
    assert task.label_names == ["dark", "light"] and task.splits["test"].labels == [0, 0, 1, 1]
    assert np.asarray(task.splits["train"].image(2))[0, 0].tolist() == [160, 160, 160]


def test_bad_image_inputs_are_one_line_errors_naming_the_file(tmp_path):
    root = class_folders(tmp_path / "bad")
    broken = root / "test" / "dog" / "1.png"
    broken.write_bytes(b"not a png")
    task = load_image_task("bad", root)
    with pytest.raises(DataError, match=r"cannot read image .*test/dog/1.png: .*replace or remove the file") as info:
        task.splits["test"].image(4)
    assert "\n" not in str(info.value)
    (root / "test" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder .*test/bird holds no images"):
        load_image_task("bad", root)
    (root / "test" / "bird").rmdir()
    write_image(root / "test" / "fox" / "0.png", 5)
    with pytest.raises(DataError, match=r"test has class folder\(s\) \['fox'\] that train lacks"):
        load_image_task("bad", root)
    with pytest.raises(DataError, match="has no test folder"):
        load_image_task("only-train", class_folders(tmp_path / "only", splits=("train",)))
    with pytest.raises(DataError, match="does not exist"):
        load_image_task("nowhere", tmp_path / "nowhere")


def test_text_task_folders_are_not_image_tasks(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello,a\n")
    assert not is_image_task_folder(tmp_path)
