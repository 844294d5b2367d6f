"""TALL masks and Consensus merging (Wang et al., ICML 2024; algorithms.md §9) with the per-task λ_t chosen on
labelled **validation** data, as the official code does.

* Multi-task vector τ_MTL: the task-arithmetic sum Σ_t τ_t (``base_merge="task_arithmetic"``, no λ) or the TIES
  dis-sum with K = 20 (``"ties"``).
* TALL mask of task t, elementwise: m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|] on the unscaled τ_MTL, with λ_t from
  ``lambdas`` = {0.2, 0.3, 0.4, 0.5, 0.6} chosen per task by the validation accuracy of θ̂_t = θ₀ + m_t ⊙ τ_MTL
  through task t's head (ties go to the first λ listed).
* ``tall_masks_reconstruct``: one reconstructed model θ̂_t **per task** (compression / task localisation). This is
  not a single merged model and must not be reported as one; the registry lists it as ``tall_masks``
  (``TALL_MASKS_SPEC``, run by ``mergelab.learned.api.tall_masks_with_data``).
* Consensus (method ``tall_consensus``): M = 1[Σ_t m_t ≥ k] (k = ``min_tasks``, default 2 drops weights no task or only
  one task relies on), θ = θ₀ + α (M ⊙ τ_MTL); α (``scale``) defaults to 1.0 and is chosen on validation by the
  benchmark's grid like any other parameter.

The weight-space method ``consensus`` (``mergelab.merging``) uses one fixed λ for every task and no data; this one is
the official per-task selection. Both use the mask functions of ``mergelab.merging.ops`` (``tall_mask``,
``consensus_mask``). Cost: ``len(lambdas)`` × T validation passes of the encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from mergelab.core.errors import ConfigError, DataError
from mergelab.learned.base import (
    DataMergeMethod,
    ExpertSet,
    State,
    assemble,
    check_layouts,
    expert_task_vectors,
    float_names,
)
from mergelab.merging.ops import consensus_mask, tall_mask, ties_multitask_vector
from mergelab.merging.spec import MethodParams, MethodSpec

BaseMerge = Literal["task_arithmetic", "ties"]
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)


def multitask_vector(
    taus: Sequence[Mapping[str, torch.Tensor]], base_merge: BaseMerge = "task_arithmetic", density: float = 0.2
) -> State:
    """τ_MTL: Σ_t τ_t, or the TIES dis-sum of the τ_t (keep ``density`` = 20%)."""
    if base_merge == "ties":
        return ties_multitask_vector(taus, density)
    return {n: torch.stack([t[n].float() for t in taus]).sum(0) for n in taus[0]}


def model_tall_mask(
    tau: Mapping[str, torch.Tensor], tau_mtl: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """Task t's TALL mask over a whole model: ``ops.tall_mask`` tensor by tensor."""
    return {n: tall_mask(tau[n], tau_mtl[n], lam) for n in tau}


def model_consensus_mask(masks: Sequence[Mapping[str, torch.Tensor]], min_tasks: int) -> dict[str, torch.Tensor]:
    """The consensus mask over whole models: ``ops.consensus_mask`` tensor by tensor."""
    return {n: consensus_mask([m[n] for m in masks], min_tasks) for n in masks[0]}


def apply_mask(
    base: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
    tau_mtl: Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> State:
    """θ₀ + α (mask ⊙ τ_MTL) for the masked names; every other key of ``base`` unchanged."""
    merged = {n: base[n].float() + scale * torch.where(mask[n], tau_mtl[n], torch.zeros(())) for n in mask}
    return assemble(base, merged)


def validation_accuracy(
    encoder: Any,
    state: Mapping[str, torch.Tensor],
    head: torch.nn.Module,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    batch_size: int,
) -> float:
    """Accuracy of head(encoder with ``state``) on labelled texts (``encoder`` is a scratch ``TextEncoder``)."""
    encoder.model.load_state_dict(dict(state), strict=True)
    features = encoder.encode_texts(list(texts), max_length=max_length, batch_size=batch_size)
    with torch.no_grad():
        predictions = head(features).argmax(-1)
    return int((predictions == torch.tensor(list(labels))).sum()) / len(predictions)


@dataclass
class TallMasks:
    """Everything the TALL selection produced: θ₀, τ_MTL, one mask and λ per task, and the validation accuracies."""

    base: State
    tau_mtl: State
    masks: dict[str, dict[str, torch.Tensor]]
    lambdas: dict[str, float]
    accuracies: dict[str, dict[float, float]]

    def reconstruct(self, task: str) -> State:
        """θ̂_t = θ₀ + m_t ⊙ τ_MTL (scale 1.0)."""
        return apply_mask(self.base, self.masks[task], self.tau_mtl)

    def consensus(self, min_tasks: int = 2, scale: float = 1.0) -> State:
        """θ₀ + α (1[Σ_t m_t ≥ k] ⊙ τ_MTL)."""
        return apply_mask(self.base, model_consensus_mask(list(self.masks.values()), min_tasks), self.tau_mtl, scale)


def compute_tall_masks(
    experts: ExpertSet,
    lambdas: Sequence[float] = TALL_LAMBDAS,
    base_merge: BaseMerge = "task_arithmetic",
    density: float = 0.2,
) -> TallMasks:
    """Per task, the λ_t in ``lambdas`` whose reconstruction has the best validation accuracy, and its mask."""
    if not lambdas:
        raise ConfigError("TALL masks need at least one candidate λ (the official grid is 0.2..0.6)")
    encoder = experts.base_encoder()
    base = {n: t.detach().clone() for n, t in encoder.model.state_dict().items()}
    states = experts.expert_states()
    check_layouts(base, states, experts.tasks)
    names = float_names(base)
    taus = expert_task_vectors(base, states, names)
    tau_mtl = multitask_vector(taus, base_merge, density)
    encoder.to(experts.device)  # a scratch encoder: each candidate's CPU state is copied in, its features come back
    masks, chosen, accuracies = {}, {}, {}
    for expert, tau in zip(experts.experts, taus, strict=True):
        if expert.labels is None or not expert.texts:
            raise DataError(f"TALL masks choose λ on labelled validation data; task '{expert.task}' has none")
        accuracies[expert.task] = {}
        best_accuracy = -1.0
        for lam in lambdas:
            mask = model_tall_mask(tau, tau_mtl, lam)
            acc = validation_accuracy(
                encoder,
                apply_mask(base, mask, tau_mtl),
                expert.model.head,
                expert.texts,
                expert.labels,
                experts.max_length,
                experts.batch_size,
            )
            accuracies[expert.task][float(lam)] = acc
            if acc > best_accuracy:
                best_accuracy, chosen[expert.task], masks[expert.task] = acc, float(lam), mask
    return TallMasks(base, tau_mtl, masks, chosen, accuracies)


def tall_masks_reconstruct(
    experts: ExpertSet,
    lambdas: Sequence[float] = TALL_LAMBDAS,
    base_merge: BaseMerge = "task_arithmetic",
    density: float = 0.2,
) -> dict[str, State]:
    """One reconstructed encoder state dict θ̂_t per task (NOT a single merged model; see module doc)."""
    result = compute_tall_masks(experts, lambdas, base_merge, density)
    return {task: result.reconstruct(task) for task in experts.tasks}


class TallMasksParams(MethodParams):
    """How the TALL masks are chosen (shared by the reconstruction and ``tall_consensus``)."""

    base_merge: BaseMerge = Field("task_arithmetic", description="τ_MTL: task-arithmetic sum or TIES dis-sum (K=20)")
    density: float = Field(0.2, gt=0.0, le=1.0, description="TIES base_merge only: fraction of |τ| kept")
    lambdas: tuple[float, ...] = Field(TALL_LAMBDAS, description="candidate λ_t of the TALL masks (official 0.2..0.6)")

    @field_validator("lambdas")
    @classmethod
    def _nonempty_nonnegative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(v < 0 for v in value):
            raise ValueError("give at least one λ, all >= 0")
        return value


class TallConsensusParams(TallMasksParams):
    min_tasks: int = Field(2, ge=0, description="keep weights in at least k tasks' TALL masks (official prun_thre_k 2)")
    scale: float = Field(1.0, ge=0.0, le=10.0, description="α on the masked multi-task vector (choose on validation)")


TALL_MASKS_SPEC = MethodSpec(
    "tall_masks",
    "TALL masks: one reconstructed model θ₀ + m_t ⊙ τ_MTL per task, λ_t chosen on validation (compression)",
    TallMasksParams,
    reads="validation",
    needs_labels=True,
    runs="in_memory",
    produces="per_task_models",
    run_with="mergelab.learned.api.tall_masks_with_data(base, models, data, options)",
)


class TallConsensus(DataMergeMethod):
    """Consensus merging with per-task TALL masks chosen on labelled validation data (module doc)."""

    spec = MethodSpec(
        "tall_consensus",
        "Consensus merging: TALL masks with λ_t per task chosen on validation, keep weights of ≥ k tasks",
        TallConsensusParams,
        reads="validation",
        needs_labels=True,
        runs="in_memory",
        min_models=2,
    )
    params: TallConsensusParams

    def merge(self, experts: ExpertSet) -> State:
        p = self.params
        key = ("tall_masks", tuple(str(e.path) for e in experts.experts), tuple(experts.tasks), p.lambdas,
               p.base_merge, p.density, experts.max_length)  # fmt: skip
        memo = experts.memo if experts.memo is not None else {}
        if key not in memo:  # the masks and λ_t do not depend on min_tasks or scale
            memo[key] = compute_tall_masks(experts, p.lambdas, p.base_merge, p.density)
        result = memo[key]
        mask = model_consensus_mask(list(result.masks.values()), p.min_tasks)
        kept = sum(int(m.sum()) for m in mask.values())
        total = sum(m.numel() for m in mask.values())
        self.info = {
            "lambdas": result.lambdas,
            "validation_accuracy": result.accuracies,
            "kept_fraction": kept / max(total, 1),
        }
        return apply_mask(result.base, mask, result.tau_mtl, p.scale)
