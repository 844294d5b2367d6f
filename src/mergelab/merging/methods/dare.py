"""DARE: randomly drop task-vector entries (and rescale the rest), then merge with task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from pydantic import Field

from mergelab.core.errors import ConfigError
from mergelab.merging.base import MergeMethod
from mergelab.merging.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams
from mergelab.merging.methods.ties import Disjoint, Scope, Ties, TiesParams
from mergelab.merging.ops import dare_drop, dare_keep_mask, require_base, task_vectors
from mergelab.merging.spec import MethodParams, MethodSpec

DARE_TA_SCALE = 0.3  # FusionBench config/method/dare/*.yaml, DARE-TA
DARE_TIES_SCALE = 0.5  # FusionBench config/method/dare/*.yaml, DARE-TIES
_TIES_ONLY = ("density", "scope", "disjoint")


class DareParams(MethodParams):
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="probability p of dropping each task-vector entry")
    rescale: bool = Field(True, description="divide the kept entries by 1 − p (keeps E[τ̃] = τ)")
    seed: int = Field(0, ge=0, description="seed of the drop masks (a mask depends on seed, model index, tensor)")
    targets: Literal["all", "weights_2d"] = Field(
        "all", description="drop in every tensor (FusionBench) or only in 2-D weight matrices"
    )
    then: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="method that merges the dropped task vectors"
    )
    scale: float | list[float] | None = Field(
        None, description="λ of the `then` method, one value or one per model (default 0.3 for TA, 0.5 for TIES)"
    )
    density: float = Field(0.2, ge=0.0, le=1.0, description="then=ties: fraction of each task vector kept")
    scope: Scope = Field("global", description="then=ties: top-k over all merged parameters or per tensor")
    disjoint: Disjoint = Field("sum", description="then=ties: sum or mean of the sign-agreeing entries")


class TaskVectorMerger(Protocol):
    """The task-vector part of TaskArithmetic and Ties."""

    def num_stat_passes(self) -> int: ...

    def observe_task_vectors(self, pass_index: int, name: str, taus: Sequence[torch.Tensor]) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def merge_task_vectors(self, name: str, taus: Sequence[torch.Tensor]) -> torch.Tensor: ...


class Dare(MergeMethod):
    """DARE (algorithms.md §4): τ̃_t = m_t ⊙ τ_t / (1 − p), then task arithmetic or TIES (with its trimming).

    Reference: FusionBench ``config/method/dare/*.yaml`` and ``fusion_bench/method/dare/`` (p = 0.5, rescale,
    every parameter dropped, DARE-TA λ = 0.3, DARE-TIES λ = 0.5 / keep 20% / sum); MergeLM
    ``mask_weights_utils.py``. The mask m_t is Bernoulli(1 − p) from a torch.Generator seeded by a hash of
    (seed, model index, tensor name), so every statistics pass and the merge pass see the same τ̃_t and a run
    is reproducible; it does not reproduce the reference's global RNG stream. ``targets="weights_2d"`` drops
    only in 2-D tensors (the "linear weights only" variant); other tensors keep their full task vector.
    """

    spec = MethodSpec(
        "dare", "DARE: drop task-vector entries at random and rescale, then task arithmetic or TIES", DareParams
    )
    params: DareParams

    def __init__(self, params: DareParams, num_models: int) -> None:
        super().__init__(params, num_models)
        default = DARE_TIES_SCALE if params.then == "ties" else DARE_TA_SCALE
        scale = default if params.scale is None else params.scale
        self.inner: TaskVectorMerger
        if params.then == "ties":
            ties_params = TiesParams(density=params.density, scope=params.scope, disjoint=params.disjoint, scale=scale)
            self.inner = Ties(ties_params, num_models)
        else:
            given = [key for key in _TIES_ONLY if key in params.model_fields_set]
            if given:
                raise ConfigError(
                    f"DARE parameter(s) {', '.join(given)} only apply with then='ties'; remove them or set then: ties"
                )
            self.inner = TaskArithmetic(TaskArithmeticParams(scale=scale), num_models)

    def num_stat_passes(self) -> int:
        return self.inner.num_stat_passes()

    def pass_needed(self, pass_index: int) -> bool:
        return self.inner.pass_needed(pass_index)

    def dropped_task_vectors(self, name: str, base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """τ̃_t for one tensor: a deterministic function of (seed, t, name) and the inputs."""
        taus = task_vectors(base, models, in_place=True)
        if self.params.targets == "weights_2d" and base.dim() != 2:
            return taus
        p = self.params
        return [
            dare_drop(tau, dare_keep_mask(tau.shape, p.drop_rate, p.seed, index, name), p.drop_rate, p.rescale)
            for index, tau in enumerate(taus)
        ]

    def observe(self, pass_index: int, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> None:
        taus = self.dropped_task_vectors(name, require_base(base, self.name), models)
        self.inner.observe_task_vectors(pass_index, name, taus)

    def end_pass(self, pass_index: int) -> None:
        self.inner.end_pass(pass_index)

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        base = require_base(base, self.name)
        return base.add_(self.inner.merge_task_vectors(name, self.dropped_task_vectors(name, base, models)))
