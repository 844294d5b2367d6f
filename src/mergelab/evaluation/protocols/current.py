"""Current Eval: the evaluated encoder's features through the task's original fine-tuned head (§15.1)."""

from __future__ import annotations

from typing import Any

from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOutcome,
    check_labels_fit,
    head_logits,
    outcome,
    reject_unknown_options,
)


def current(ctx: ProtocolContext, *, seed: int = 0, shots: int = 0, **options: Any) -> ProtocolOutcome:
    """ŷ = argmax head(features) on the eval split. Deterministic: ``seed`` and ``shots`` are ignored."""
    reject_unknown_options("current", options, current)
    split = ctx.eval_features()
    logits = head_logits(ctx.head, split.features)
    check_labels_fit(ctx.task, split, logits.shape[1], ctx.eval_split)
    return outcome(logits, split.labels, transductive=False)
