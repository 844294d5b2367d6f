"""Protocols on an accelerator without touching them: a ``ProtocolContext`` whose tensors live on a device.

The protocols are pure functions of feature tensors and a head that compute wherever those tensors are, and bring
their predictions back to the CPU. ``on_device(ctx, device)`` gives the same context with every feature, label and
the head on ``device``; on the CPU (or when already there) it returns ``ctx`` itself, so the CPU path is unchanged.
The caller's head is never moved: an accelerator gets a copy.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from mergelab.core.device import module_device
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.types import SplitFeatures, TaskFeatures


def features_on(features: TaskFeatures, device: torch.device) -> TaskFeatures:
    """``features`` with every split's features and labels on ``device`` (the same object when already there)."""
    if all(s.features.device == device and s.labels.device == device for s in features.splits.values()):
        return features
    splits = {name: SplitFeatures(s.features.to(device), s.labels.to(device)) for name, s in features.splits.items()}
    return TaskFeatures(features.task, splits)


def head_on(head: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``head`` itself when it is on ``device``, else a copy there (protocols never modify it, callers keep theirs)."""
    return head if module_device(head) == device else copy.deepcopy(head).to(device)


def on_device(ctx: ProtocolContext, device: torch.device | None) -> ProtocolContext:
    """``ctx`` with its features (evaluated, fine-tuned, ensemble) and head on ``device``; ``ctx`` itself when
    ``device`` is None or everything is already there (a CPU context on the CPU)."""
    if device is None:
        return ctx
    evaluated, head = features_on(ctx.evaluated, device), head_on(ctx.head, device)
    finetuned = None if ctx.finetuned is None else features_on(ctx.finetuned, device)
    ensemble = [features_on(f, device) for f in ctx.ensemble_features]
    parts = [(evaluated, ctx.evaluated), (head, ctx.head), (finetuned, ctx.finetuned),
             *zip(ensemble, ctx.ensemble_features, strict=True)]  # fmt: skip
    if all(new is old for new, old in parts):
        return ctx
    return replace(ctx, evaluated=evaluated, head=head, finetuned=finetuned, ensemble_features=ensemble)
