"""Loading text classification tasks: user folders (csv / jsonl / parquet), saved HF DatasetDicts, built-in tasks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.core.errors import DataError
from mergelab.data.catalog import load_builtin_task
from mergelab.data.types import TextSplit, TextTask

__all__ = ["TextSplit", "TextTask", "load_task", "load_task_folder", "load_hf_dataset_dict", "load_hub_dataset",
           "labels_to_ids"]  # fmt: skip

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}
FORMATS = (".csv", ".jsonl", ".json", ".parquet", ".tsv")
SplitMap = Mapping[str, str]  # our split (train / validation / test) → the dataset's split name (or a file's stem)


def check_split_map(splits: SplitMap | None, task: str) -> None:
    """A split mapping names only train / validation / test (DataError otherwise)."""
    unknown = sorted(set(splits or {}) - set(SPLIT_ALIASES))
    if unknown:
        raise DataError(f"task '{task}': splits maps {unknown}; only {', '.join(SPLIT_ALIASES)} can be mapped")


def split_candidates(split: str, splits: SplitMap | None) -> tuple[str, ...]:
    """The names ``split`` may have in a dataset or folder: the mapped name if mapped, else its usual aliases."""
    if splits and split in splits:
        return (str(splits[split]),)
    return SPLIT_ALIASES[split]


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


def _find_split_file(folder: Path, split: str, splits: SplitMap | None = None) -> Path | None:
    for alias in split_candidates(split, splits):
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
                     label_names: list[str] | None = None, splits: SplitMap | None = None) -> TextTask:  # fmt: skip
    """A folder with train.* and test.* (and optional validation.* / val.*) in csv, tsv, jsonl or parquet;
    ``splits`` renames them (e.g. ``{"test": "dev"}`` reads dev.csv as the test split)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} for task '{name}' does not exist")
    check_split_map(splits, name)
    files = {split: _find_split_file(folder, split, splits) for split in SPLIT_ALIASES}
    for required in ("train", "test"):
        if files[required] is None:
            stem = split_candidates(required, splits)[0]
            raise DataError(
                f"task '{name}': no {required} file in {folder} (expected {stem}.csv, .jsonl, .parquet or .tsv)"
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


def _split_columns(part: Any, where: str, split: str, text_column: str,
                   label_column: str) -> tuple[list[str], list[Any], list[str] | None]:  # fmt: skip
    """One dataset split's texts, raw labels and ClassLabel names (None without); missing columns are an error."""
    for column in (text_column, label_column):
        if column not in part.column_names:
            raise DataError(f"{where} split '{split}' has no '{column}' column (columns: "
                            f"{', '.join(part.column_names)}); set text_column / label_column")  # fmt: skip
    names = getattr(part.features[label_column], "names", None)
    return [str(t) for t in part[text_column]], list(part[label_column]), list(names) if names else None


def _dataset_split(dataset: Any, split: str, splits: SplitMap | None, where: str) -> str | None:
    """The dataset's name for ``split`` (None if absent); a mapped split that is absent is an error."""
    found = next((a for a in split_candidates(split, splits) if a in dataset), None)
    if found is None and splits and split in splits:
        raise DataError(f"{where} has no split '{splits[split]}' (mapped from {split}); its splits: "
                        f"{', '.join(dataset)}; fix the task's splits")  # fmt: skip
    return found


def task_from_dataset_dict(name: str, dataset: Any, where: str, text_column: str = "text", label_column: str = "label",
                           splits: SplitMap | None = None) -> TextTask:  # fmt: skip
    """A ``DatasetDict``'s train / test (/ validation) splits as a task; ClassLabel names are used when present."""
    check_split_map(splits, name)
    raw, texts = {}, {}
    label_names = None
    for split in SPLIT_ALIASES:
        found = _dataset_split(dataset, split, splits, where)
        if found is not None:
            texts[split], raw[split], names = _split_columns(dataset[found], where, found, text_column, label_column)
            label_names = names or label_names
    for required in ("train", "test"):
        if required not in raw:
            raise DataError(f"task '{name}': the DatasetDict at {where} has no {required} split "
                            f"(splits: {', '.join(dataset)}); map one with the task's splits")  # fmt: skip
    if label_names is not None:
        raw = {s: [label_names[int(y)] if not isinstance(y, str) else y for y in v] for s, v in raw.items()}
    ids, names = labels_to_ids(raw, label_names, name)
    splits_out = {s: TextSplit(texts[s], ids[s]) for s in texts}
    provenance: dict[str, Any] = {"source": where, "sizes": {s: len(v) for s, v in splits_out.items()}}
    if splits:
        provenance["splits"] = dict(splits)
    return TextTask(name, splits_out, names, provenance)


def load_hf_dataset_dict(name: str, path: str | Path, text_column: str = "text", label_column: str = "label",
                         splits: SplitMap | None = None) -> TextTask:  # fmt: skip
    """A Hugging Face ``DatasetDict`` saved with ``save_to_disk``; ClassLabel names are used when present."""
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError("reading a saved DatasetDict needs the datasets package: pip install datasets") from None
    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load a saved DatasetDict from {path}: {exc}") from exc
    return task_from_dataset_dict(name, dataset, str(path), text_column, label_column, splits)


def hub_dataset_hint(source: str, subset: str | None) -> str:
    """How to bring a Hub dataset to a machine without a network: save it elsewhere, then give its folder."""
    args = f"'{source}'" + (f", '{subset}'" if subset else "")
    command = f"import datasets; datasets.load_dataset({args}).save_to_disk('DIR')"
    return f'on a machine with a network run `python -c "{command}"`, copy DIR here and give it as the task\'s path'


def load_hub_dataset(name: str, source: str, subset: str | None = None, text_column: str = "text",
                     label_column: str = "label", splits: SplitMap | None = None) -> TextTask:  # fmt: skip
    """A dataset of the Hugging Face Hub (``datasets.load_dataset(source, subset)``), online or from its cache."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"task '{name}': Hub datasets need the datasets package: pip install datasets") from None
    try:
        dataset = load_dataset(source, subset)
    except Exception as exc:  # offline, unknown dataset or subset, network errors: all say the same thing to do
        label = f"'{source}'" + (f" (subset '{subset}')" if subset else "")
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        raise DataError(f"task '{name}': cannot download dataset {label} from the Hugging Face Hub (offline? "
                        f"{reason}); {hub_dataset_hint(source, subset)}") from exc  # fmt: skip
    where = f"hf:{source}" + (f"/{subset}" if subset else "")
    return task_from_dataset_dict(name, dataset, where, text_column, label_column, splits)


def load_task(name: str, path: str | Path | None = None, *, source: str | None = None, subset: str | None = None,
              splits: SplitMap | None = None, **kwargs: Any) -> TextTask:  # fmt: skip
    """A folder of split files, a saved DatasetDict, a Hub dataset (``source``), or (none) a built-in offline task.

    ``splits`` maps train / validation / test to the dataset's split names (or the folder's file stems).
    """
    if source is not None:
        if path is not None:
            raise DataError(f"task '{name}' gives both a path and a Hub source '{source}'; give one of them")
        return load_hub_dataset(name, source, subset, splits=splits, **kwargs)
    if path is None:
        if splits or subset:
            raise DataError(f"task '{name}': splits / subset apply to a path or a Hub source; give one")
        return load_builtin_task(name, **kwargs)
    folder = Path(path)
    if (folder / "dataset_dict.json").exists():
        return load_hf_dataset_dict(name, folder, splits=splits, **kwargs)
    return load_task_folder(name, folder, splits=splits, **kwargs)
