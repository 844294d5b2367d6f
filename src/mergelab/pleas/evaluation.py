"""Evaluating PLeaS-merged models with the shared protocols (``mergelab.evaluation``) on cached features.

The label spaces of A and B differ, so the heads are left out of the merge and every protocol scores the merged
features per task against the original model that owns the task (its *teacher*). The protocols expect one head for
both the evaluated and the teacher features; a merged model's features have the layout
``[merged (n − s) | A-only (s) | B-only (s)]`` of its feature group (``spec.feature_group``), so the teacher's head
and features are *lifted* into that layout (``lift_head``, ``lift_features``): the teacher's units go to the
positions its matched / separate units occupy, the other model's separate block gets zeros. The lifted head on the
lifted features gives exactly the original logits, so

* ``current`` is the original head on the merged features (Current Eval, through the matching),
* ``ft_classifier`` refits a copy of that head on unlabelled train inputs by KL to the original model's outputs,
* ``linear_probe`` trains a fresh linear head with labels (the head only fixes the class count).

An original model on its own task has the identity layout; the side-by-side ensemble ``[A | B]`` has the
all-separate one. Features come from ``evaluate.features.FeatureCache``, keyed by a content fingerprint of the model
(architecture and weights) and of the task's images: each (model, split) is extracted once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.protocols.common import ProtocolContext, ProtocolOutcome
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.evaluation.types import SplitFeatures, TaskFeatures
from mergelab.io.fingerprint import state_dict_fingerprint
from mergelab.pleas.partial import GroupSplit
from mergelab.pleas.vision_data import VisionTask

Side = Literal["a", "b"]
FEATURE_KIND = "pleas-features"  # the feature-cache kind: the input of the task head (``model.features``)
Cell = tuple[str, str, dict[str, Any], int, int]  # (stored name, protocol, options, seed, shots)


class FeatureModule(nn.Module):
    """``model.features`` as a module mapping a batch to [B, d] (what the feature cache runs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def model_fingerprint(model: nn.Module) -> str:
    """Content fingerprint of a model: its architecture (``repr``: strides, widths) and every tensor."""
    return hashlib.sha256(f"{model!r}|{state_dict_fingerprint(model.state_dict())}".encode()).hexdigest()


def features_of(cache: FeatureCache, model: nn.Module, task: VisionTask, batch_size: int = 256) -> TaskFeatures:
    """Features (``model.features``, or the output of a merged model whose head is ``nn.Identity``) of ``model``
    on the task's train and test splits, read from ``cache`` or extracted once and stored."""
    encoder = FeatureModule(model) if hasattr(model, "features") else model
    return cache.features(encoder, model_fingerprint(model), task, splits=("train", "test"), batch_size=batch_size,
                          kind=FEATURE_KIND)  # fmt: skip


def identity_split(width: int) -> GroupSplit:
    """The layout of an original model's own features: every unit merged with the same index of the other."""
    units, empty = torch.arange(width), torch.zeros(0, dtype=torch.long)
    return GroupSplit(merged_a=units, merged_b=units.clone(), only_a=empty, only_b=empty.clone())


def concat_split(width: int) -> GroupSplit:
    """The layout of the side-by-side ensemble ``[A | B]``: every unit separate."""
    units, empty = torch.arange(width), torch.zeros(0, dtype=torch.long)
    return GroupSplit(merged_a=empty, merged_b=empty.clone(), only_a=units, only_b=units.clone())


def lift_features(features: torch.Tensor, split: GroupSplit, side: Side) -> torch.Tensor:
    """Columns of ``side``'s features [N, n] placed in the merged layout [N, width]: its merged units at the merged
    block, its separate units at its own block, zeros at the other model's block."""
    if side not in ("a", "b"):
        raise ConfigError(f"side must be 'a' or 'b', got {side!r}")
    own = split.merged_a if side == "a" else split.merged_b
    width = split.num_merged + split.num_separate
    if features.shape[-1] != width:
        raise ConfigError(f"features of width {features.shape[-1]} do not fit a split of {width} units per model")
    out = features.new_zeros(*features.shape[:-1], split.width)
    out[..., split.offsets("m")] = features[..., own]
    out[..., split.offsets(side)] = features[..., split.indices(side, side)]
    return out


def lift_head(head: nn.Module, split: GroupSplit, side: Side) -> nn.Linear:
    """A linear head on the merged layout with ``lift_head(h)(lift_features(f)) == h(f)`` (the original head is
    untouched; nothing is drawn from the global RNG)."""
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"PLeaS evaluation lifts linear task heads only, got {type(head).__name__}")
    lifted = nn.utils.skip_init(nn.Linear, split.width, head.out_features, bias=head.bias is not None,
                                dtype=head.weight.dtype)  # fmt: skip
    with torch.no_grad():
        lifted.weight.copy_(lift_features(head.weight, split, side))
        if head.bias is not None:
            lifted.bias.copy_(head.bias)
    return lifted.eval()


def lift_task_features(features: TaskFeatures, split: GroupSplit, side: Side) -> TaskFeatures:
    """``lift_features`` on every split of ``features`` (labels unchanged)."""
    return TaskFeatures(features.task, {name: SplitFeatures(lift_features(s.features, split, side), s.labels)
                                        for name, s in features.splits.items()})  # fmt: skip


@dataclass(frozen=True)
class Teacher:
    """The original model of one task: its features on the task, its head, and which model it is (A or B)."""

    features: TaskFeatures
    head: nn.Module
    side: Side


def protocol_context(evaluated: TaskFeatures, teacher: Teacher, split: GroupSplit) -> ProtocolContext:
    """The protocols' view of ``evaluated`` features with layout ``split`` on the teacher's task: the lifted head,
    and the teacher's features lifted into the same layout as the ``finetuned`` features."""
    return ProtocolContext(
        task=evaluated.task,
        evaluated=evaluated,
        head=lift_head(teacher.head, split, teacher.side),
        finetuned=lift_task_features(teacher.features, split, teacher.side),
    )


def evaluate_cells(
    evaluated: TaskFeatures, teacher: Teacher, split: GroupSplit, cells: Iterable[Cell]
) -> list[tuple[Cell, ProtocolOutcome]]:
    """Every protocol cell (``evaluate.api.expand_cells``' tuples) on one task, through ``run_protocol``."""
    ctx = protocol_context(evaluated, teacher, split)
    return [(cell, run_protocol(cell[1], ctx, seed=cell[3], shots=cell[4], **cell[2])) for cell in cells]

