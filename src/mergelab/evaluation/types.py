"""Plain data carried between feature extraction and the protocols."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergelab.core.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitFeatures:
    """Encoder features of one split of one task: ``features`` [N, d] float32, ``labels`` [N] int64."""

    features: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.labels.ndim != 1 or len(self.features) != len(self.labels):
            raise ValueError(
                f"features must be [N, d] and labels [N]; got {tuple(self.features.shape)} and "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskFeatures:
    """Features of one encoder on every available split of one task (``validation`` may be missing)."""

    task: str
    splits: dict[str, SplitFeatures] = field(default_factory=dict)

    @property
    def width(self) -> int | None:
        """The feature width d (None when no split is present)."""
        return next((int(s.features.shape[1]) for s in self.splits.values()), None)

    def split(self, name: str) -> SplitFeatures:
        if name not in self.splits:
            raise DataError(
                f"task '{self.task}' has no '{name}' split (has: {', '.join(sorted(self.splits))}); "
                f"add a {name} file to the task's data folder"
            )
        return self.splits[name]
