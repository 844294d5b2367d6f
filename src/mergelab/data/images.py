"""Image classification tasks: class folders, saved HF ``DatasetDict``s with an image column, CSV/JSONL of paths.

Images are not decoded when a task is loaded: a split holds each image's source (a file path, or the encoded bytes
of a DatasetDict row) and decodes it on demand (``ImageSplit.image(i)``, RGB), so a feature pass holds one batch of
pixels at a time. Preprocessing is the model's own image processor (``mergelab.models.vision``), never done here.
A task's ``content_hash`` covers the label names and every image's bytes and label, so cached features follow the
data, not its location.

Layouts:

* a folder with ``train/``, ``test/`` and optionally ``validation/`` (``val``, ``valid``, ``dev``), each holding one
  sub-folder per class of image files; the classes are train's sub-folders, sorted;
* a ``DatasetDict`` saved with ``save_to_disk`` whose splits have an image column (``image``) and a label column
  (``label``; ClassLabel names are used when present);
* a folder with ``train.csv`` / ``test.csv`` [/ ``validation.csv``] (or ``.jsonl``) of ``path,label`` rows, paths
  relative to that folder.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mergelab.core.errors import DataError
from mergelab.data.types import check_splits

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".jsonl")

Source = Path | bytes


@dataclass(frozen=True)
class ImageSplit:
    """Images (each a file path or encoded bytes, decoded on demand) and integer labels (0..C-1) of one split."""

    sources: list[Source]
    labels: list[int]
    names: list[str] = field(default_factory=list)  # how to name an image in an error (its path or row)

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.labels):
            raise DataError(f"a split has {len(self.sources)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` decoded as RGB; an unreadable image is a DataError naming it."""
        source = self.sources[index]
        name = self.names[index] if self.names else str(source if isinstance(source, Path) else f"row {index}")
        try:
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {name}: {exc}; replace or remove the file") from None

    def images(self, start: int, stop: int) -> list[Image.Image]:
        """Images ``start`` … ``stop − 1`` decoded (one batch)."""
        return [self.image(i) for i in range(start, min(stop, len(self)))]

    def subset(self, indices: Sequence[int]) -> ImageSplit:
        """The images ``indices`` (in that order) as a split of their own, still undecoded."""
        names = [self.names[i] for i in indices] if self.names else []
        return ImageSplit([self.sources[i] for i in indices], [int(self.labels[i]) for i in indices], names)


@dataclass(frozen=True)
class ImageTask:
    """A named image task: splits (train and test required), label names, provenance."""

    name: str
    splits: dict[str, ImageSplit]
    label_names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_splits("image task", self.name, self.splits,
                     "add a {split}/ folder (one sub-folder per class) or a {split}.csv of path,label rows")

    modality = "image"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @cached_property
    def _content_hash(self) -> str:
        return self._hash()

    def content_hash(self) -> str:
        """sha256 over the label names and every split's image bytes and labels (a cache key for features); read
        once per task, since it reads every image file."""
        return self._content_hash

    def _hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.label_names).encode())
        for split_name in sorted(self.splits):
            split = self.splits[split_name]
            digest.update(split_name.encode())
            for index, (source, label) in enumerate(zip(split.sources, split.labels, strict=True)):
                digest.update(f"{label}\t".encode())
                digest.update(hashlib.sha256(_bytes_of(source, split, index)).digest())
        return digest.hexdigest()


def _bytes_of(source: Source, split: ImageSplit, index: int) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as exc:
        name = split.names[index] if split.names else str(source)
        raise DataError(f"cannot read image {name}: {exc.strerror or exc}") from None


def _find_split(root: Path, split: str, make: Any) -> Any:
    for alias in SPLIT_ALIASES[split]:
        found = make(root, alias)
        if found is not None:
            return found
    return None


def _class_folder_split(root: Path, alias: str) -> dict[str, list[Path]] | None:
    folder = root / alias
    if not folder.is_dir():
        return None
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images or "
                            "remove the folder")  # fmt: skip
        classes[sub.name] = files
    if not classes:
        raise DataError(f"{folder} has no class sub-folders; put each class's images in {folder}/<class>/")
    return classes


def load_image_folder(name: str, root: str | Path) -> ImageTask:
    """``root/{train,test[,validation]}/<class>/<image>``: the classes are train's sub-folders (sorted)."""
    root = Path(root)
    found = {s: _find_split(root, s, _class_folder_split) for s in SPLIT_ALIASES}
    if found["train"] is None or found["test"] is None:
        missing = [s for s in ("train", "test") if found[s] is None]
        raise DataError(f"image task '{name}': {root} has no {' or '.join(missing)} folder; add {root}/train/<class>/ "
                        f"and {root}/test/<class>/ folders of images")  # fmt: skip
    label_names = list(found["train"])
    splits = {}
    for split, classes in found.items():
        if classes is None:
            continue
        unknown = sorted(set(classes) - set(label_names))
        if unknown:
            raise DataError(f"image task '{name}': {split} has class folder(s) {unknown} that train lacks; every "
                            f"class needs train images (train classes: {label_names})")  # fmt: skip
        pairs = [(path, label_names.index(c)) for c in label_names if c in classes for path in classes[c]]
        splits[split] = ImageSplit([p for p, _ in pairs], [y for _, y in pairs], [str(p) for p, _ in pairs])
    return ImageTask(name, splits, label_names, {"source": str(root), "format": "class folders"})


def _table_split(root: Path, alias: str) -> list[dict[str, Any]] | None:
    import pandas as pd  # lazy: pandas costs ~0.5 s to import and only tables need it

    for suffix in TABLE_SUFFIXES:
        path = root / f"{alias}{suffix}"
        if path.is_file():
            try:
                frame = pd.read_csv(path) if suffix == ".csv" else pd.read_json(path, lines=True)
            except ValueError as exc:
                raise DataError(f"cannot read {path}: {exc}") from None
            missing = [c for c in ("path", "label") if c not in frame.columns]
            if missing:
                raise DataError(f"{path} has no {missing} column(s) (columns: {list(frame.columns)}); give path,label")
            return [{"path": root / str(r["path"]), "label": str(r["label"]), "file": path} for r in frame.to_dict("records")]
    return None


def load_image_table(name: str, root: str | Path, label_names: Sequence[str] | None = None) -> ImageTask:
    """``root/{train,test[,validation]}.{csv,jsonl}`` of ``path,label`` rows (paths relative to ``root``)."""
    root = Path(root)
    found = {s: _find_split(root, s, _table_split) for s in SPLIT_ALIASES}
    if found["train"] is None or found["test"] is None:
        raise DataError(f"image task '{name}': {root} needs train.csv and test.csv (or .jsonl) of path,label rows")
    names = list(label_names) if label_names else sorted({r["label"] for r in found["train"]})
    splits = {}
    for split, rows in found.items():
        if rows is None:
            continue
        unknown = sorted({r["label"] for r in rows} - set(names))
        if unknown:
            raise DataError(f"image task '{name}': {rows[0]['file']} has label(s) {unknown[:5]} that train lacks "
                            f"(labels: {names[:10]}); fix the labels or add train images of them")  # fmt: skip
        missing = [str(r["path"]) for r in rows if not r["path"].is_file()]
        if missing:
            raise DataError(f"image task '{name}': {len(missing)} image file(s) of {rows[0]['file']} do not exist, "
                            f"e.g. {missing[0]}; paths are relative to {root}")  # fmt: skip
        splits[split] = ImageSplit([r["path"] for r in rows], [names.index(r["label"]) for r in rows],
                                   [str(r["path"]) for r in rows])  # fmt: skip
    return ImageTask(name, splits, names, {"source": str(root), "format": "path,label tables"})


def load_image_dataset_dict(name: str, path: str | Path, image_column: str = "image",
                            label_column: str = "label") -> ImageTask:  # fmt: skip
    """A saved ``DatasetDict`` with an image column; images kept encoded until a batch needs them."""
    try:
        from datasets import Image as ImageFeature  # lazy: datasets is an optional dependency (~1 s import)
        from datasets import load_from_disk
    except ImportError:
        raise DataError("reading a saved DatasetDict needs the datasets package: pip install datasets") from None
    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"cannot load a saved DatasetDict from {path}: {exc}") from None
    label_names: list[str] | None = None
    splits = {}
    for split in SPLIT_ALIASES:
        found = next((a for a in SPLIT_ALIASES[split] if a in dataset), None)
        if found is None:
            continue
        part = dataset[found]
        missing = [c for c in (image_column, label_column) if c not in part.column_names]
        if missing:
            raise DataError(f"{path} split '{found}' has no {missing} column(s) (columns: {part.column_names}); "
                            "name the image and label columns")  # fmt: skip
        label_names = label_names or list(getattr(part.features[label_column], "names", None) or [])
        part = part.cast_column(image_column, ImageFeature(decode=False))
        sources = [_encoded(row, path, found, i) for i, row in enumerate(part[image_column])]
        splits[split] = ImageSplit(sources, [int(y) for y in part[label_column]], [f"{path} {found} row {i}" for i in range(len(sources))])
    if "train" not in splits or "test" not in splits:
        raise DataError(f"image task '{name}': the DatasetDict at {path} needs train and test splits (has {list(dataset)})")
    if not label_names:
        label_names = [str(c) for c in range(max(max(s.labels) for s in splits.values()) + 1)]
    return ImageTask(name, splits, label_names, {"source": str(path), "format": "DatasetDict"})


def _encoded(row: dict[str, Any], path: str | Path, split: str, index: int) -> Source:
    if row.get("bytes"):
        return bytes(row["bytes"])
    if row.get("path"):
        return Path(row["path"])
    raise DataError(f"{path} split '{split}' row {index} has no image (neither bytes nor a path)")


def load_image_task(name: str, path: str | Path, **columns: str) -> ImageTask:
    """A saved DatasetDict, a folder of path,label tables, or a folder of class folders (in that order)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"image task '{name}': {root} does not exist")
    if (root / "dataset_dict.json").is_file():
        return load_image_dataset_dict(name, root, **columns)
    if any((root / f"train{s}").is_file() for s in TABLE_SUFFIXES):
        return load_image_table(name, root)
    return load_image_folder(name, root)


def is_image_task_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like an image task: a train/ folder of class folders, or a train table with a
    ``path`` column (a text task's train.csv has ``text``)."""
    root = Path(path)
    train = root / "train"
    if train.is_dir() and any(sub.is_dir() for sub in train.iterdir()):
        return True
    csv, jsonl = root / "train.csv", root / "train.jsonl"
    if csv.is_file():
        header = csv.read_text(errors="replace").splitlines()[:1]
        return bool(header) and "path" in [c.strip() for c in header[0].split(",")]
    if jsonl.is_file():
        first = jsonl.read_text(errors="replace").splitlines()[:1]
        return bool(first) and "path" in json.loads(first[0])
    return False
