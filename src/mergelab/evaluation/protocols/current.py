"""Current Eval: the evaluated encoder's features through the task's original fine-tuned head (§15.1)."""

from __future__ import annotations

from typing import Any, ClassVar

from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    check_labels_fit,
    head_logits,
    outcome,
)


class CurrentOptions(ProtocolOptions):
    """Current has no options."""

    protocol: ClassVar[str] = "current"


def current(ctx: ProtocolContext, *, seed: int = 0, shots: int = 0, **options: Any) -> ProtocolOutcome:
    """ŷ = argmax head(features) on the eval split. Deterministic: ``seed`` and ``shots`` are ignored."""
    CurrentOptions.parse(options)
    split = ctx.eval_features()
    logits = head_logits(ctx.head, split.features)
    check_labels_fit(ctx.task, split, logits.shape[1], ctx.eval_split)
    return outcome(logits, split.labels, transductive=False)
