"""KNN Eval (paper §3.2, Eq. 5): the class of smallest MEAN Euclidean distance to its k labelled anchors.

Anchors are k labelled items per class drawn (seeded, stratified) from the evaluated encoder's *train* split,
never from the scored items. The score of class c for an input x is (1/k) Σ_{a ∈ A_c} ‖g(x) − g(a)‖₂ — the
mean distance to the class's anchors, which is neither the distance to the anchors' centroid nor a k-NN vote.
No head is used (the head only fixes the number of classes, so every class gets anchors).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from mergelab.core.errors import DataError
from mergelab.core.sampling import sample_per_class
from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    accuracy,
    check_labels_fit,
    num_classes,
)

DISTANCE_CHUNK = 1024  # eval rows per torch.cdist call


class KnnOptions(ProtocolOptions):
    """KNN Eval's options (``shots`` anchors per class come from the run, not from here)."""

    protocol: ClassVar[str] = "knn"
    chunk_size: int = Field(DISTANCE_CHUNK, gt=0, description="eval rows per distance computation (memory only)")


def mean_distance_scores(
    features: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    classes: int,
    chunk: int = DISTANCE_CHUNK,
) -> torch.Tensor:
    """[N, C] mean Euclidean distance of each row of ``features`` to the anchors of each class.

    Classes may have different anchor counts; a class without anchors gets +inf.
    """
    if anchors.shape[1] != features.shape[1]:
        raise DataError(f"anchors have dimension {anchors.shape[1]} but features {features.shape[1]}")
    anchor_labels = anchor_labels.to(anchors.device).long()
    one_hot = torch.nn.functional.one_hot(anchor_labels, classes).to(anchors.dtype)  # [M, C]
    counts = one_hot.sum(dim=0)
    parts = []
    for i in range(0, len(features), chunk):
        dist = torch.cdist(features[i : i + chunk].to(anchors.dtype), anchors)  # [n, M]
        parts.append((dist @ one_hot) / counts.clamp(min=1))
    scores = torch.cat(parts) if parts else torch.empty(0, classes, dtype=anchors.dtype)
    scores[:, counts == 0] = float("inf")
    return scores


def knn(ctx: ProtocolContext, *, seed: int = 0, shots: int = 5, **options: Any) -> ProtocolOutcome:
    """KNN Eval with ``shots`` anchors per class drawn with ``seed`` from the merged train split (options:
    ``KnnOptions``)."""
    opts = KnnOptions.parse(options)
    split = ctx.eval_features()
    train = ctx.evaluated.split("train")
    classes = num_classes(ctx.head, split.features)
    check_labels_fit(ctx.task, split, classes, ctx.eval_split)
    index = sample_per_class(
        train.labels, shots, seed, num_classes=classes, what=f"task '{ctx.task}' train split"
    )
    anchors = train.features[index]
    with torch.no_grad():
        scores = mean_distance_scores(split.features, anchors, train.labels[index], classes, opts.chunk_size)
    predictions = scores.argmin(dim=1).cpu()
    return ProtocolOutcome(accuracy(predictions, split.labels), predictions, False, {"anchors": len(index)})
