"""Linear probe (reference point): a fresh linear head trained with labels on k samples per class.

A new ``nn.Linear(d, C)`` (C = the fine-tuned head's output count), zero-initialised so the result depends
only on the few-shot draw, is trained with cross-entropy on ``shots`` *labelled* train items per class drawn
with ``seed`` (the same draw as KNN anchors and the FT-Classifier refit set). Optimiser: full-batch Adam (lr
1e-2, betas 0.9/0.999, no weight decay), 300 steps — the few-shot set is tiny, so this is a few milliseconds
per step and reaches ~zero training loss on separable features. The fine-tuned head is not used beyond its
class count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mergelab.core.rng import derive_seed
from mergelab.core.sampling import sample_per_class
from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    check_labels_fit,
    head_logits,
    num_classes,
    outcome,
    seeded,
)


class LinearProbeOptions(ProtocolOptions):
    """The linear probe's optimiser: full-batch Adam."""

    protocol: ClassVar[str] = "linear_probe"
    lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    steps: int = Field(300, gt=0, description="full-batch Adam steps")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    *,
    seed: int,
    lr: float = 1e-2,
    steps: int = 300,
    weight_decay: float = 0.0,
) -> tuple[nn.Module, float]:
    """Linear probe trained by cross-entropy on (``features``, ``labels``); returns it and its final loss."""
    probe = nn.Linear(features.shape[1], classes, device=features.device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    labels = labels.to(features.device).long()
    with seeded(derive_seed(seed, "linear_probe")), torch.enable_grad():
        optimiser = torch.optim.Adam(probe.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = F.cross_entropy(probe(features), labels)
            loss.backward()
            optimiser.step()
    return probe.eval(), float(loss.detach())


def linear_probe(
    ctx: ProtocolContext,
    *,
    seed: int = 0,
    shots: int = 5,
    **options: Any,
) -> ProtocolOutcome:
    """Linear probe on ``shots`` labelled train items per class of the evaluated encoder (seeded; options:
    ``LinearProbeOptions``)."""
    opts = LinearProbeOptions.parse(options)
    split = ctx.eval_features()
    train = ctx.evaluated.split("train")
    classes = num_classes(ctx.head, split.features)
    check_labels_fit(ctx.task, split, classes, ctx.eval_split)
    index = sample_per_class(
        train.labels, shots, seed, num_classes=classes, what=f"task '{ctx.task}' train split"
    )
    probe, loss = train_probe(
        train.features[index].float(),
        train.labels[index],
        classes,
        seed=seed,
        lr=opts.lr,
        steps=opts.steps,
        weight_decay=opts.weight_decay,
    )
    return outcome(
        head_logits(probe, split.features.float()), split.labels, False, samples=len(index), train_loss=loss
    )
