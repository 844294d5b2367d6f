"""The text task data types: one split's texts and labels, and a named task with its splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergelab.core.errors import DataError


@dataclass(frozen=True)
class TextSplit:
    """Texts and integer labels (0..C-1) of one split."""

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"a split has {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> TextSplit:
        """The items ``indices`` (in that order) as a split of their own."""
        return TextSplit([self.texts[i] for i in indices], [int(self.labels[i]) for i in indices])


def check_splits(kind: str, name: str, splits: Mapping[str, Any], how_to_add: str) -> None:
    """Train and test are present (``how_to_add`` says how to add one) and no split is empty."""
    for required in ("train", "test"):
        if required not in splits:
            raise DataError(f"{kind} '{name}' has no {required} split; {how_to_add.format(split=required)}")
    for split_name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"{kind} '{name}': the {split_name} split is empty")


@dataclass(frozen=True)
class TextTask:
    """A named task: splits (train and test required, validation optional), label names, provenance."""

    name: str
    splits: dict[str, TextSplit]
    label_names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_splits("task", self.name, self.splits, "add a {split}.csv/.jsonl/.parquet file")
        for split_name, split in self.splits.items():
            bad = sorted({y for y in split.labels if not 0 <= y < len(self.label_names)})
            if bad:
                raise DataError(f"task '{self.name}': {split_name} labels {bad[:5]} are outside 0..{len(self.label_names) - 1}")

    modality = "text"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def content_hash(self) -> str:
        """sha256 over the label names and every split's texts and labels (a cache key for features)."""
        digest = hashlib.sha256(json.dumps(self.label_names).encode())
        for split_name in sorted(self.splits):
            split = self.splits[split_name]
            digest.update(split_name.encode())
            for text, label in zip(split.texts, split.labels, strict=True):
                digest.update(f"{label}\t{len(text)}\t".encode())
                digest.update(text.encode())
        return digest.hexdigest()
