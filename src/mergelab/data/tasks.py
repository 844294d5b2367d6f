"""Loading text classification tasks: user folders (csv / jsonl / parquet), saved HF DatasetDicts, built-in tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelab.core.errors import DataError
from mergelab.data.catalog import load_builtin_task
from mergelab.data.types import TextSplit, TextTask

__all__ = ["TextSplit", "TextTask", "load_task", "load_task_folder", "load_hf_dataset_dict", "labels_to_ids"]

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}
FORMATS = (".csv", ".jsonl", ".json", ".parquet", ".tsv")


def _read_table(path: Path) -> Any:
    import pandas as pd

    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False)
        if path.suffix == ".tsv":
            return pd.read_csv(path, sep="\t", keep_default_na=False)
        if path.suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=path.suffix == ".jsonl")
        return pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(f"cannot read {path}: {exc}") from exc


def _find_split_file(folder: Path, split: str) -> Path | None:
    for alias in SPLIT_ALIASES[split]:
        for suffix in FORMATS:
            candidate = folder / f"{alias}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def labels_to_ids(raw: dict[str, list[Any]], label_names: list[str] | None, task: str) -> tuple[dict[str, list[int]], list[str]]:
    """Map raw labels (strings or ints) of every split to 0..C-1; unseen test labels are an error."""
    train = raw["train"]
    if label_names is None:
        if all(isinstance(y, int) or (isinstance(y, str) and y.lstrip("-").isdigit()) for y in train):
            label_names = [str(v) for v in sorted({int(y) for y in train})]  # numeric order, not string order
        else:
            label_names = sorted({str(y) for y in train})
    index = {name: i for i, name in enumerate(label_names)}
    out = {}
    for split, values in raw.items():
        ids = []
        for y in values:
            key = str(int(y)) if (not isinstance(y, str) and float(y).is_integer()) else str(y)
            if key not in index:
                raise DataError(
                    f"task '{task}': label {y!r} in the {split} split does not occur in train (train labels: "
                    f"{', '.join(label_names[:20])}); every class must have training examples"
                )
            ids.append(index[key])
        out[split] = ids
    return out, label_names


def load_task_folder(name: str, path: str | Path, text_column: str = "text", label_column: str = "label",
                     label_names: list[str] | None = None) -> TextTask:  # fmt: skip
    """A folder with train.* and test.* (and optional validation.* / val.*) in csv, tsv, jsonl or parquet."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} for task '{name}' does not exist")
    files = {split: _find_split_file(folder, split) for split in SPLIT_ALIASES}
    for required in ("train", "test"):
        if files[required] is None:
            raise DataError(
                f"task '{name}': no {required} file in {folder} (expected {required}.csv, .jsonl, .parquet or .tsv)"
            )
    texts, raw = {}, {}
    for split, file in files.items():
        if file is None:
            continue
        frame = _read_table(file)
        for column in (text_column, label_column):
            if column not in frame.columns:
                raise DataError(
                    f"{file} has no '{column}' column (columns: {', '.join(map(str, frame.columns))}); "
                    f"set text_column / label_column"
                )
        if len(frame) == 0:
            raise DataError(f"task '{name}': {file} has no rows")
        texts[split] = [str(t) for t in frame[text_column].tolist()]
        raw[split] = frame[label_column].tolist()
    ids, names = labels_to_ids(raw, label_names, name)
    splits = {split: TextSplit(texts[split], ids[split]) for split in texts}
    provenance = {"source": str(folder), "files": {s: str(f) for s, f in files.items() if f}, "sizes": {s: len(v) for s, v in splits.items()}}
    return TextTask(name, splits, names, provenance)


def load_hf_dataset_dict(name: str, path: str | Path, text_column: str = "text", label_column: str = "label") -> TextTask:
    """A Hugging Face ``DatasetDict`` saved with ``save_to_disk``; ClassLabel names are used when present."""
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError("reading a saved DatasetDict needs the datasets package: pip install datasets") from None
    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load a saved DatasetDict from {path}: {exc}") from exc
    raw, texts = {}, {}
    label_names = None
    for split in SPLIT_ALIASES:
        found = next((a for a in SPLIT_ALIASES[split] if a in dataset), None)
        if found is None:
            continue
        part = dataset[found]
        for column in (text_column, label_column):
            if column not in part.column_names:
                raise DataError(f"{path} split '{found}' has no '{column}' column (columns: {', '.join(part.column_names)})")
        feature = part.features[label_column]
        if getattr(feature, "names", None):
            label_names = list(feature.names)
        texts[split] = [str(t) for t in part[text_column]]
        raw[split] = list(part[label_column])
    for required in ("train", "test"):
        if required not in raw:
            raise DataError(f"task '{name}': the DatasetDict at {path} has no {required} split")
    if label_names is not None:
        raw = {s: [label_names[int(y)] if not isinstance(y, str) else y for y in v] for s, v in raw.items()}
    ids, names = labels_to_ids(raw, label_names, name)
    splits = {s: TextSplit(texts[s], ids[s]) for s in texts}
    return TextTask(name, splits, names, {"source": str(path), "sizes": {s: len(v) for s, v in splits.items()}})


def load_task(name: str, path: str | Path | None = None, **kwargs: Any) -> TextTask:
    """A folder of split files, a saved DatasetDict, or (no path) a built-in offline task."""
    if path is None:
        return load_builtin_task(name, **kwargs)
    folder = Path(path)
    if (folder / "dataset_dict.json").exists():
        return load_hf_dataset_dict(name, folder, **kwargs)
    return load_task_folder(name, folder, **kwargs)
