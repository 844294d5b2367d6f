"""Representation Surgery (algorithms.md §8): a per-task adapter on the evaluated features (transductive).

Adapter z̃ = z − U·ReLU(D z): D ∈ R^{r×d} Kaiming-uniform (a = √5, no bias), U ∈ R^{d×r} zero (so it starts as
the identity), rank r = 16. Loss: mean L1 between z̃ and the fine-tuned encoder's features of the same inputs
(teacher detached), on *unlabelled eval-split inputs* (transductive). Prediction: head(z̃).

Reference schedule: Adam(lr 1e-3, betas 0.9/0.999, wd 0), 500 iterations × 2 optimiser steps per task, batch
16 = 1000 steps of batch 16 (default ``steps=1000``, ``batch_size=16``); batches are drawn from shuffled
passes over the unlabelled set (reshuffled each pass). ``samples`` limits how many eval inputs the adapter may
see (drawn uniformly, seeded); ``samples_per_class`` = k means k × C of them (C = the head's classes), the number
of unlabelled inputs FT-Classifier gets at k shots, so the paper's Figure 7 compares the two at equal counts.
All eval items are scored. ``seed`` drives D's initialisation, the sample draw and the batch order.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from mergelab.core.rng import derive_seed
from mergelab.core.sampling import sample_count
from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    check_labels_fit,
    head_logits,
    outcome,
    paired_split,
    seeded,
)


class SurgeryOptions(ProtocolOptions):
    """The adapter, how many eval inputs it sees, and its Adam schedule (module doc)."""

    protocol: ClassVar[str] = "surgery"
    samples: int | None = Field(None, gt=0, description="eval inputs the adapter sees, drawn uniformly (null: all)")
    samples_per_class: int | None = Field(
        None, gt=0, description="k: k × C eval inputs, FT-Classifier's count at k shots (null: use samples)"
    )
    rank: int = Field(16, gt=0, description="adapter rank r")
    steps: int = Field(1000, gt=0, description="Adam steps")
    batch_size: int = Field(16, gt=0, description="inputs per Adam step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")

    @model_validator(mode="after")
    def _one_sample_count(self) -> SurgeryOptions:
        if self.samples is not None and self.samples_per_class is not None:
            raise ValueError("give samples or samples_per_class, not both")
        return self


class SurgeryAdapter(nn.Module):
    """z ↦ z − U·ReLU(D z) with D Kaiming-uniform (a = √5) and U = 0."""

    def __init__(self, dim: int, rank: int = 16, device: torch.device | None = None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, dim, device=device))
        self.up = nn.Parameter(torch.zeros(dim, rank, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features - torch.relu(features @ self.down.T) @ self.up.T


def fit_adapter(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    seed: int,
    rank: int = 16,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
) -> SurgeryAdapter:
    """An adapter mapping ``source`` towards ``target`` features (L1, Adam, shuffled mini-batches)."""
    target = target.detach()
    generator = torch.Generator().manual_seed(derive_seed(seed, "surgery-batches"))
    with seeded(derive_seed(seed, "surgery-init")), torch.enable_grad():
        adapter = SurgeryAdapter(source.shape[1], rank, device=source.device)
        optimiser = torch.optim.Adam(adapter.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        order = torch.randperm(len(source), generator=generator)
        position = 0
        for _ in range(steps):
            if position >= len(order):
                order, position = torch.randperm(len(source), generator=generator), 0
            batch = order[position : position + batch_size].to(source.device)
            position += batch_size
            optimiser.zero_grad(set_to_none=True)
            loss = (adapter(source[batch]) - target[batch]).abs().mean()
            loss.backward()
            optimiser.step()
    return adapter.eval()


def surgery(ctx: ProtocolContext, *, seed: int = 0, shots: int = 0, **options: Any) -> ProtocolOutcome:
    """Representation Surgery on the eval split (transductive; options: ``SurgeryOptions``); ``shots`` is ignored
    (see ``samples_per_class``)."""
    opts = SurgeryOptions.parse(options)
    samples = opts.samples
    finetuned = ctx.require_finetuned("surgery")
    merged_split, finetuned_split = paired_split(
        ctx.task, ctx.evaluated, finetuned, ctx.eval_split, "merged and fine-tuned"
    )
    source, target = merged_split.features.float(), finetuned_split.features.float()
    index = torch.arange(len(source))
    if opts.samples_per_class is not None:
        with torch.no_grad():
            samples = opts.samples_per_class * int(head_logits(ctx.head, source[:1]).shape[1])
    if samples is not None:
        index = sample_count(
            len(source),
            samples,
            derive_seed(seed, "surgery-samples"),
            what=f"task '{ctx.task}' {ctx.eval_split} split",
        )
    adapter = fit_adapter(
        source[index],
        target[index],
        seed=seed,
        rank=opts.rank,
        steps=opts.steps,
        batch_size=opts.batch_size,
        lr=opts.lr,
    )
    with torch.no_grad():
        adapted = adapter(source)
        extras = {
            "samples": len(index),
            "l1_before": float((source - target).abs().mean()),
            "l1_after": float((adapted - target).abs().mean()),
        }
    logits = head_logits(ctx.head, adapted)
    check_labels_fit(ctx.task, merged_split, logits.shape[1], ctx.eval_split)
    return outcome(logits, merged_split.labels, True, **extras)
