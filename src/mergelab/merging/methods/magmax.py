"""MagMax: per entry, the task-vector entry of largest magnitude; θ = θ₀ + λ τ_max."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.merging.base import MergeMethod
from mergelab.merging.ops import require_base, task_vectors
from mergelab.merging.spec import MethodParams, MethodSpec


class MagMaxParams(MethodParams):
    scale: float = Field(0.5, description="λ applied to the max-magnitude task vector")


def max_magnitude(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per entry the τ_t of largest |τ_t|; on ties the later model wins (``>=``, as the reference)."""
    best = taus[0].clone()
    for tau in taus[1:]:
        wins = tau.abs() >= best.abs()
        best[wins] = tau[wins]
    return best


class MagMax(MergeMethod):
    """MagMax (algorithms.md §10).

    Reference: magmax ``src/merging/task_vectors.py::merge_max_abs`` and ``merge_8datasets.py`` (λ = 0.5);
    FusionBench ``config/method/magmax/magmax.yaml``. Ties go to the later model.
    """

    spec = MethodSpec(
        "magmax", "MagMax: keep each entry's largest-magnitude task-vector value, scaled by λ", MagMaxParams
    )
    params: MagMaxParams

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        base = require_base(base, self.name)
        return base.add_(max_magnitude(task_vectors(base, models, in_place=True)), alpha=self.params.scale)
