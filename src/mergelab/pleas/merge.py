"""The PLeaS pipeline: match → partial merge at a FLOPs budget → least squares → batch-norm re-estimation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.pleas.batchnorm import reestimate_batchnorm_
from mergelab.pleas.least_squares import least_squares_
from mergelab.pleas.matching import Matching, activation_matching, weight_matching
from mergelab.pleas.options import PleasOptions
from mergelab.pleas.partial import (
    GroupSplit,
    allocate_separate_units,
    flops_ratio,
    layer_macs,
    partial_merge,
    ratios_of,
    split_groups,
)
from mergelab.pleas.spec import PermutationSpec

MatchingKind = Literal["activation", "weight"]
DEFAULT_OPTIONS = PleasOptions()


@dataclass
class PleasResult:
    """The merged model and how it was built."""

    model: nn.Module
    matching: Matching
    splits: dict[str, GroupSplit]
    ratios: dict[str, float]
    flops_ratio: float
    residuals: dict[str, float] = field(default_factory=dict)

    @property
    def mean_residual(self) -> float | None:
        """Mean relative least-squares residual over the refitted layers (None without least squares)."""
        return sum(self.residuals.values()) / len(self.residuals) if self.residuals else None


def match(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    inputs: torch.Tensor,
    *,
    kind: MatchingKind = "activation",
    options: PleasOptions = DEFAULT_OPTIONS,
) -> Matching:
    """Activation matching (on ``inputs``) or seeded Git Re-Basin weight matching."""
    if kind == "activation":
        return activation_matching(model_a, model_b, spec, inputs, batch_size=options.batch_size,
                                   max_batches=options.max_batches, similarity=options.similarity)  # fmt: skip
    if kind == "weight":
        return weight_matching(model_a, model_b, spec, max_iter=options.max_iter, seed=options.seed)
    raise ConfigError(f"unknown matching '{kind}'; use 'activation' or 'weight'")


def pleas_merge(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    inputs: torch.Tensor,
    *,
    budget: float = 1.0,
    matching: MatchingKind | Matching = "activation",
    options: PleasOptions = DEFAULT_OPTIONS,
) -> PleasResult:
    """Merge A and B into one model with ``budget`` × the FLOPs of one model (1.0 … 2.0).

    ``inputs`` are unlabelled inputs (e.g. both tasks' training images) used for activation matching, least
    squares and batch-norm re-estimation. ``matching`` may be a precomputed ``Matching`` (reused across
    budgets). ``options`` holds the other settings (``PleasOptions``).
    """
    if isinstance(matching, str):
        matching = match(model_a, model_b, spec, inputs, kind=matching, options=options)
    sizes = spec.group_sizes(model_a)
    macs = layer_macs(model_a, spec, tuple(inputs.shape[1:]))
    separate = allocate_separate_units(spec, sizes, macs, budget, options.priority)
    splits = split_groups(matching, separate)
    merged = partial_merge(model_a, model_b, spec, splits)
    residuals: dict[str, float] = {}
    if options.least_squares:
        report = least_squares_(
            merged, model_a, model_b, spec, splits, inputs, batch_size=options.batch_size,
            max_batches=options.max_batches, ridge=options.ridge, positions_per_image=options.positions_per_image,
            seed=options.seed,
        )  # fmt: skip
        residuals = report.relative_residual
    if options.reestimate_bn:
        reestimate_batchnorm_(merged, inputs, options.batch_size, options.max_batches)
    merged.eval()
    ratios = ratios_of(separate, sizes)
    return PleasResult(model=merged, matching=matching, splits=splits, ratios=ratios,
                       flops_ratio=flops_ratio(spec, macs, ratios), residuals=residuals)  # fmt: skip
