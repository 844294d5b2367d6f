"""Weight averaging: θ = Σ_t w_t θ_t with weights normalised to sum 1 (equal by default)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, field_validator

from mergelab.core.errors import ConfigError
from mergelab.merging.base import MergeMethod, per_model_values
from mergelab.merging.spec import MethodParams, MethodSpec


class WeightAverageParams(MethodParams):
    weights: list[float] | None = Field(
        None, description="one non-negative weight per model, normalised to sum 1 (default: equal weights)"
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and any(w < 0 for w in weights):
            raise ValueError(f"weights must be non-negative, got {weights}")
        return weights


class WeightAverage(MergeMethod):
    """Weight averaging (algorithms.md §1).

    Reference: FusionBench ``config/method/simple_average.yaml`` / ``fusion_bench/method/simple_average.py``
    (running sum divided by T). Optional per-model ``weights`` are an extension; they are normalised to sum 1.
    No base is needed.
    """

    spec = MethodSpec(
        "weight_average",
        "Weight averaging: the (optionally weighted) mean of the fine-tuned weights",
        WeightAverageParams,
        needs_base=False,
    )
    params: WeightAverageParams

    def __init__(self, params: WeightAverageParams, num_models: int) -> None:
        super().__init__(params, num_models)
        self.weights: list[float] | None = None
        if params.weights is not None:
            raw = per_model_values(params.weights, num_models, "weights")
            total = sum(raw)
            if total <= 0:
                raise ConfigError(f"'weights' {raw} sum to {total}; give at least one positive weight")
            self.weights = [w / total for w in raw]

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        # accumulate in place into the first (owned) input: no [T, ...] stack
        if self.weights is None:
            total = models[0]
            for model in models[1:]:
                total.add_(model)
            return total.div_(len(models))
        total = models[0].mul_(self.weights[0])
        for weight, model in zip(self.weights[1:], models[1:], strict=True):
            total.add_(model, alpha=weight)
        return total
