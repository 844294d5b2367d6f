"""NeuLig (Neural Ligand; "Multi-Level Collaboration in Model Merging", arXiv 2503.01268; algorithms.md §14).

The "Portland" router is Linear(K·d → K) + softmax over the concatenated features of the K fine-tuned encoders:
w(x) = softmax(W [f_1(x); …; f_K(x)] + b). Only the router is trained (encoders frozen, so it trains on cached
features of the experts' **train** split), round-robin over tasks, one Adam step per (task, batch):

    loss = CE(h_t(Σ_k w_k(x) f_k(x)), y)        (``loss="ce"``, the reference ``sup``)
         | entropy(softmax(h_t(Σ_k w_k f_k)))   (``loss="entropy"``, the reference ``semi``)
         + mean_x (Σ_k w_k(x) ξ̃_k)² / 100,

where ξ_k = Σ_j (θ_k − θ̄)_j is the scalar sum of model k's deviation from the mean weights, standardised across the K
models (unbiased std). Two outputs are compared per task (``evaluate_neulig``):

* ensembling: per item, h_t(Σ_k w_k(x) f_k(x)) (feature level);
* merging: per batch, θ = Σ_k w_k θ_k (a convex combination of the **full** fine-tuned encoders) with w from the
  batch's first item (``weights_from="first"``, the reference; it relies on single-task batches) or the batch mean
  (``"mean"``), then h_t(f(x; θ)).

This is input-dependent merging, not one static model: every batch runs all K encoders and rebuilds the weights.
Its settings are one model, :class:`NeuLigOptions` (used whole by ``learned.api.neulig_with_data``, `mergelab
neulig` and the benchmark's ``neulig:`` section); the registry lists it as ``neulig`` (``NEULIG_SPEC``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import module_device, to_device
from mergelab.core.errors import ConfigError, DataError
from mergelab.evaluation.protocols.common import seeded
from mergelab.learned.adamerging import entropy
from mergelab.learned.base import State
from mergelab.merging.spec import MethodParams, MethodSpec

RouterLoss = Literal["ce", "entropy"]
WeightsFrom = Literal["first", "mean"]


class NeuLigOptions(MethodParams):
    """Everything NeuLig is run with, besides the inputs' ``max_length`` (the defaults are the benchmark's)."""

    loss: RouterLoss = Field(default="ce", description="CE on labels (sup) or entropy (semi)")
    steps: int = Field(default=300, ge=1, description="Adam steps (round-robin over tasks, one batch per task each)")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the router")
    batch_size: int = Field(default=128, ge=1, description="train features per task per router step")
    train_examples: int | None = Field(default=512, ge=1, description="train inputs per task for the router")
    weights_from: list[WeightsFrom] = Field(
        default_factory=lambda: ["first", "mean"], min_length=1,
        description="merge weights of a test batch: its first item's (reference code) and/or the batch mean",
    )  # fmt: skip
    eval_batch_size: int = Field(default=16, ge=1, description="test items per merged model (one task per batch)")
    test_examples: int | None = Field(default=None, ge=1, description="first N test items per task (None: all)")
    regulariser_scale: float = Field(default=100.0, gt=0, description="divisor of the ξ regulariser")
    seed: int = Field(default=0, description="seed of the router's init, batches and train-input sample")

    @field_validator("weights_from", mode="before")
    @classmethod
    def _one_rule_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


NEULIG_SPEC = MethodSpec(
    "neulig",
    "NeuLig: a router over the experts' features picks merge weights per test batch (input-dependent merging)",
    NeuLigOptions,
    reads="train",
    needs_labels=True,
    runs="in_memory",
    needs_base=False,
    produces="router",
    run_with="`mergelab neulig`; mergelab.learned.api.neulig_with_data(models, data, options)",
)


class Portland(nn.Module):
    """The router: Linear(K·d → K) + softmax."""

    def __init__(self, num_models: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_models * dim, num_models)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat(list(features), dim=-1)).softmax(-1)


def standardized_xi(states: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """ξ_k = Σ_j (θ_k − θ̄)_j over all float tensors, standardised across the K models (zeros if all equal)."""
    names = [n for n, t in states[0].items() if t.is_floating_point()]
    xi = torch.zeros(len(states), dtype=torch.float64)
    for name in names:
        stacked = torch.stack([s[name].double() for s in states])
        xi += (stacked - stacked.mean(0)).reshape(len(states), -1).sum(1)
    if len(states) < 2:
        return torch.zeros(len(states))
    std = xi.std()
    return ((xi - xi.mean()) / (std if std > 0 else 1.0)).float()


def regulariser(weights: torch.Tensor, xi: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """mean_x (Σ_k w_k(x) ξ̃_k)² / scale."""
    return ((weights @ xi.to(weights.dtype)) ** 2).mean() / scale


def ensemble_features(weights: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k w_k(x) f_k(x) per item: weights [B, K], features K × [B, d]."""
    return sum(weights[:, k : k + 1] * f for k, f in enumerate(features))


def _check_features(features: Sequence[Sequence[torch.Tensor]], heads: Sequence[nn.Module]) -> None:
    if len(features) != len(heads) or not features:
        raise DataError(f"NeuLig needs one head per task: {len(features)} tasks of features, {len(heads)} heads")
    k = len(features[0])
    for t, task_features in enumerate(features):
        if len(task_features) != k or len({tuple(f.shape) for f in task_features}) != 1:
            raise DataError(f"task {t}: every task needs the features of all {k} experts with one shape [N, d]")


def train_router(
    features: Sequence[Sequence[torch.Tensor]],
    labels: Sequence[torch.Tensor | None],
    heads: Sequence[nn.Module],
    xi: torch.Tensor,
    loss: RouterLoss = "ce",
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 128,
    regulariser_scale: float = 100.0,
    seed: int = 0,
) -> Portland:
    """Train the router on cached features: ``features[t][k]`` = expert k's features [N_t, d] of task t's inputs.

    Each of ``steps`` rounds takes one batch per task in turn (round-robin, one Adam step each); a task's batches
    come from successive seeded shuffles of its items. ``labels[t]`` is needed for ``loss="ce"`` only.
    """
    _check_features(features, heads)
    if loss == "ce" and any(y is None for y in labels):
        raise DataError("the CE router loss needs labels for every task; use loss='entropy' for unlabelled data")
    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):
        router = Portland(len(features[0]), features[0][0].shape[1])
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    frozen = [copy.deepcopy(h).eval().requires_grad_(False) for h in heads]
    orders: list[list[int]] = [[] for _ in features]
    for _ in range(steps):
        for task, (feats, head) in enumerate(zip(features, frozen, strict=True)):
            size = min(batch_size, len(feats[0]))
            if len(orders[task]) < size:
                orders[task] += torch.randperm(len(feats[0]), generator=generator).tolist()
            idx, orders[task] = torch.tensor(orders[task][:size]), orders[task][size:]
            batch = [f[idx] for f in feats]
            weights = router(batch)
            logits = head(ensemble_features(weights, batch))
            task_labels = labels[task]
            objective = (
                F.cross_entropy(logits, task_labels[idx])
                if loss == "ce" and task_labels is not None
                else entropy(logits)
            )
            objective = objective + regulariser(weights, xi, regulariser_scale)
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
    return router.eval()


def batch_weights(router: Portland, features: Sequence[torch.Tensor], weights_from: WeightsFrom) -> torch.Tensor:
    """The K merge weights of one batch: the first item's (reference) or the batch mean."""
    with torch.no_grad():
        weights = router(features)
    return weights[0] if weights_from == "first" else weights.mean(0)


def merge_states(states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor) -> State:
    """Σ_k w_k θ_k over float tensors; integer buffers from the first model."""
    out = {}
    for name, reference in states[0].items():
        if reference.is_floating_point():
            out[name] = sum(float(w) * s[name].float() for w, s in zip(weights, states, strict=True)).to(
                reference.dtype
            )
        else:
            out[name] = reference.clone()
    return out


def merge_vs_ensemble(
    router: Portland,
    batches: Sequence[tuple[Sequence[torch.Tensor], Any, torch.Tensor]],
    states: Sequence[Mapping[str, torch.Tensor]],
    encode: Callable[[State, Any], torch.Tensor],
    head: nn.Module,
    weights_from: WeightsFrom = "first",
) -> dict[str, Any]:
    """Ensembling and merging accuracy (and ensemble − merge gap), the mean largest merge weight ``top_weight`` and
    the mean merge weights per expert, on one task's batches of
    (expert features K × [B, d], raw inputs, labels [B]); ``encode(θ, inputs)`` runs the encoder with weights θ."""
    correct_ensemble = correct_merge = total = 0
    used_weights = []
    with torch.no_grad():
        for feats, inputs, labels in batches:
            ensemble = head(ensemble_features(router(feats), feats))
            weights = batch_weights(router, feats, weights_from)
            merged = head(encode(merge_states(states, weights), inputs))
            correct_ensemble += int((ensemble.argmax(-1) == labels).sum())
            correct_merge += int((merged.argmax(-1) == labels).sum())
            total += len(labels)
            used_weights.append(weights)
    if total == 0:
        raise DataError("NeuLig evaluation got no test items")
    ensemble_acc, merge_acc = correct_ensemble / total, correct_merge / total
    stacked = torch.stack(used_weights)
    return {"ensemble": ensemble_acc, "merge": merge_acc, "gap": ensemble_acc - merge_acc,
            "top_weight": float(stacked.max(1).values.mean()),  # 1.0 = the merge is one expert (pitfall 3)
            "mean_weights": stacked.mean(0).tolist()}  # fmt: skip


@dataclass
class NeuLigTask:
    """One task's test data for ``evaluate_neulig``: texts, labels, the K experts' features of those texts, head."""

    texts: list[str]
    labels: list[int]
    features: list[torch.Tensor]
    head: nn.Module


def expert_features(
    encoders: Sequence[Any], texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 32
) -> list[torch.Tensor]:
    """Each ``TextEncoder``'s features [N, d] of ``texts`` (the cacheable input of the router)."""
    return [encoder.encode_texts(list(texts), max_length=max_length, batch_size=batch_size) for encoder in encoders]


def evaluate_neulig(
    router: Portland,
    encoder: Any,
    states: Sequence[Mapping[str, torch.Tensor]],
    tasks: Mapping[str, NeuLigTask],
    weights_from: WeightsFrom = "first",
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, dict[str, Any]]:
    """Per task: ensembling accuracy, merging accuracy and their gap, on consecutive batches of ``batch_size`` items
    in data order. ``encoder`` is a scratch ``TextEncoder`` of the experts' architecture (its weights are replaced
    batch by batch); ``states`` are the K experts' encoder state dicts in its layout. The encoder runs on its own
    device (the merged CPU state is copied in); its features, the router and the heads are on the CPU."""
    if weights_from not in ("first", "mean"):
        raise ConfigError(f"weights_from must be 'first' or 'mean', got {weights_from!r}")
    device = module_device(encoder)

    def encode(state: State, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        encoder.model.load_state_dict(state, strict=True)
        return encoder(**to_device(inputs, device)).float().cpu()  # deliberate: the heads score on the CPU

    results = {}
    for name, task in tasks.items():
        batches = []
        for start in range(0, len(task.texts), batch_size):
            stop = start + batch_size
            inputs = dict(
                encoder.tokenizer(
                    task.texts[start:stop], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
                )
            )
            batches.append(([f[start:stop] for f in task.features], inputs, torch.tensor(task.labels[start:stop])))
        results[name] = merge_vs_ensemble(router, batches, states, encode, task.head.eval(), weights_from)
    return results
