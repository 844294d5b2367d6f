"""Model Stock: per tensor, interpolate between the base and the average by the task vectors' mean cosine."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.merging.base import MergeMethod
from mergelab.merging.ops import require_base, task_vectors
from mergelab.merging.spec import MethodParams, MethodSpec

_EPS = 1e-8


class ModelStockParams(MethodParams):
    """Model Stock has no parameters."""


def mean_pairwise_cosine(taus: Sequence[torch.Tensor]) -> float:
    """Mean over pairs i < j of cos(τ_i, τ_j) (a pair with a zero vector counts as cosine 0)."""
    flat = torch.stack([t.reshape(-1) for t in taus]).to(torch.float64)
    gram = flat @ flat.T
    norms = gram.diagonal().sqrt()
    cosines = gram / (norms.unsqueeze(0) * norms.unsqueeze(1)).clamp(min=_EPS)
    i, j = torch.triu_indices(len(taus), len(taus), offset=1)
    return float(cosines[i, j].mean())


def interpolation_ratio(cos: float, num_models: int) -> float:
    """t = N cos / (1 + (N − 1) cos) with cos clamped to [0, 1], so t ∈ [0, 1]."""
    cos = min(1.0, max(0.0, cos))
    return num_models * cos / (1.0 + (num_models - 1) * cos)


class ModelStock(MergeMethod):
    """Model Stock (algorithms.md §11): w = t·w_avg + (1 − t)·w₀ per tensor.

    Semantics: mergekit 0.1.5 ``model_stock`` (the mean of the pairwise cosines; 1.2e-7 from it in
    ``benchmarks/peer_parity.py``). FusionBench's ``model_stock.py`` averages the pairwise *angles* instead (8.9e-5
    apart there). Deliberate difference: the mean pairwise cosine is clamped to [0, 1], so t never goes negative or
    explodes when the task vectors point apart; cos = 0 returns the base, cos = 1 the average. Designed for several
    fine-tunes of one task from one base.
    """

    spec = MethodSpec(
        "model_stock",
        "Model Stock: move from the base towards the average by the task vectors' agreement (cosine)",
        ModelStockParams,
        min_models=2,
    )

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        base = require_base(base, self.name)
        taus = task_vectors(base, models, in_place=True)  # in place: `models` now hold τ_t
        ratio = interpolation_ratio(mean_pairwise_cosine(taus), len(models))
        mean_tau = taus[0]
        for tau in taus[1:]:
            mean_tau.add_(tau)
        mean_tau.div_(len(taus))
        # t·w_avg + (1 − t)·w₀ = w₀ + t·mean_t τ_t
        return base.add_(mean_tau, alpha=ratio)
