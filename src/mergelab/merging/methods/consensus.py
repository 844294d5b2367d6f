"""Consensus merging (TALL-masks paper, Wang et al. 2024), task-arithmetic variant.

TALL mask of task t, elementwise: m_t = 1[|τ_t| > λ · |τ_MTL − τ_t|] (strict, as the official code), with
τ_MTL = Σ_t τ_t. Consensus mask: M = 1[Σ_t m_t ≥ k] (k = ``min_tasks``, default 2: drops weights no task or only
one task relies on). θ = θ₀ + α · M ⊙ τ_MTL.

Reference: nik-dim/tall_masks (``consensus`` with TA, ``prun_thre_k`` 2) and FusionBench's fixed
``tall_mask_lambda`` 0.6. This weight-space version takes one λ as a parameter (the benchmark chooses (λ, α) on the
validation split like any other grid); ``tall_consensus`` (``mergelab.learned``) is the official recipe with λ_t
chosen per task on labelled validation data. Both use the same mask functions (``mergelab.merging.ops``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.merging.base import MergeMethod, chunk_slices
from mergelab.merging.ops import consensus_mask, require_base, tall_mask, task_vectors
from mergelab.merging.spec import MethodParams, MethodSpec


class ConsensusParams(MethodParams):
    tall_lambda: float = Field(0.6, ge=0.0, description="λ of the TALL masks |τ_t| > λ|τ_MTL − τ_t| (FusionBench 0.6)")
    min_tasks: int = Field(2, ge=0, description="keep weights used by at least this many tasks' TALL masks")
    scale: float = Field(1.0, description="α applied to the masked multi-task vector")


class Consensus(MergeMethod):
    """θ = θ₀ + α · 1[Σ_t m_t ≥ k] ⊙ Σ_t τ_t (see module doc)."""

    spec = MethodSpec(
        "consensus",
        "Consensus merging: task arithmetic on weights kept by at least k tasks' TALL masks",
        ConsensusParams,
        min_models=2,
    )
    params: ConsensusParams

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        base = require_base(base, self.name)
        flats = [t.reshape(-1) for t in task_vectors(base, models, in_place=True)]
        out = base.reshape(-1)
        for s in chunk_slices(out.numel()):
            chunk = [f[s] for f in flats]
            multitask = torch.stack(chunk).sum(0)
            masks = [tall_mask(tau, multitask, self.params.tall_lambda) for tau in chunk]
            keep = consensus_mask(masks, self.params.min_tasks)
            out[s] += self.params.scale * torch.where(keep, multitask, torch.zeros(()))
        return base
