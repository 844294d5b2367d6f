"""Ensemble reference: the T fine-tuned encoders' eval features averaged, then the task's head.

``extras["logit_average_accuracy"]`` reports the other ensemble: the mean over t of head(features_t)
(averaging logits instead of features). Deterministic: ``seed`` and ``shots`` are ignored; ``merged`` is not
used.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergelab.core.errors import DataError
from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    accuracy,
    check_labels_fit,
    head_logits,
    outcome,
    paired_split,
)


class EnsembleOptions(ProtocolOptions):
    """Ensemble has no options."""

    protocol: ClassVar[str] = "ensemble"


def ensemble(ctx: ProtocolContext, *, seed: int = 0, shots: int = 0, **options: Any) -> ProtocolOutcome:
    """Feature-average ensemble of ``ctx.ensemble_features`` scored with ``ctx.head`` on the eval split."""
    EnsembleOptions.parse(options)
    members = list(ctx.ensemble_features)
    if not members:
        raise DataError(
            f"protocol 'ensemble' on task '{ctx.task}' needs the features of the T fine-tuned encoders; "
            f"pass ProtocolContext(ensemble_features=[...])"
        )
    splits = [paired_split(ctx.task, members[0], m, ctx.eval_split, "ensemble members'")[1] for m in members]
    shapes = {tuple(s.features.shape) for s in splits}
    if len(shapes) != 1:
        raise DataError(f"task '{ctx.task}': ensemble members' features differ in shape {sorted(shapes)}")
    stacked = torch.stack([s.features.float() for s in splits])
    logits = head_logits(ctx.head, stacked.mean(dim=0))
    labels = splits[0].labels
    check_labels_fit(ctx.task, splits[0], logits.shape[1], ctx.eval_split)
    logit_mean = torch.stack([head_logits(ctx.head, f) for f in stacked]).mean(dim=0)
    logit_accuracy = accuracy(logit_mean.argmax(dim=1), labels)
    return outcome(logits, labels, False, members=len(members), logit_average_accuracy=logit_accuracy)
