"""NeuLig ("Portland" router; Multi-Level Collaboration in Model Merging, arXiv 2503.01268).

A linear map over the concatenated features of the K fine-tuned encoders, softmax to K merge weights:
w(x) = softmax(W [f_1(x); …; f_K(x)] + b). Training (router only, encoders frozen, features cached):
loss = CE(h_t(Σ_k w_k f_k(x)), y) (``loss="ce"``) or the entropy of that prediction (``"entropy"``), plus the scalar
regulariser mean((Σ_k w_k ξ̃_k)²) / 100, where ξ_k = Σ_j (θ_k − θ̄)_j is standardised across models (as the reference).
Merging for a batch: θ = Σ_k w_k θ_k with w taken from the batch's first item (``weights_from="first"``, the reference)
or the batch mean (``"mean"``). ``merge_vs_ensemble`` reports both accuracies and their gap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class Portland(nn.Module):
    """The router: Linear(K·d → K) + softmax."""

    def __init__(self, num_models: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_models * dim, num_models)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat(list(features), dim=-1)).softmax(-1)


def standardized_xi(states: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """ξ_k = Σ_j (θ_k − θ̄)_j over all float tensors, standardised across the K models."""
    names = [n for n, t in states[0].items() if t.is_floating_point()]
    xi = torch.zeros(len(states), dtype=torch.float64)
    for name in names:
        stacked = torch.stack([s[name].double() for s in states])
        xi += (stacked - stacked.mean(0)).reshape(len(states), -1).sum(1)
    std = xi.std()
    return ((xi - xi.mean()) / (std if std > 0 else 1.0)).float()


def train_router(features: Sequence[Sequence[torch.Tensor]], labels: Sequence[torch.Tensor], heads: Sequence[nn.Module],
                 xi: torch.Tensor, loss: Literal["ce", "entropy"] = "ce", steps: int = 200, lr: float = 1e-3,
                 batch_size: int = 128, regulariser_scale: float = 100.0, seed: int = 0) -> Portland:  # fmt: skip
    """Train the router round-robin over tasks: ``features[t][k]`` = expert k's features [N_t, d] on task t's inputs."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = Portland(len(features[0]), features[0][0].shape[1])
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    for head in heads:
        head.eval().requires_grad_(False)
    for _ in range(steps):
        for task, (feats, y, head) in enumerate(zip(features, labels, heads, strict=True)):
            del task
            idx = torch.randint(len(y), (min(batch_size, len(y)),), generator=generator)
            batch = [f[idx] for f in feats]
            weights = router(batch)
            logits = head(sum(weights[:, k : k + 1] * batch[k] for k in range(len(batch))))
            if loss == "ce":
                objective = F.cross_entropy(logits, y[idx])
            else:
                probs = logits.softmax(-1)
                objective = -(probs * (probs + 1e-8).log()).sum(-1).mean()
            objective = objective + ((weights @ xi) ** 2).mean() / regulariser_scale
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
    return router.eval()


def batch_weights(router: Portland, features: Sequence[torch.Tensor], weights_from: Literal["first", "mean"]) -> torch.Tensor:
    """The K merge weights of one batch: the first item's (reference) or the batch mean."""
    with torch.no_grad():
        weights = router(features)
    return weights[0] if weights_from == "first" else weights.mean(0)


def merge_states(states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_k w_k θ_k (a convex combination of full fine-tuned weights); integer buffers from the first model."""
    return {name: (sum(float(w) * s[name].float() for w, s in zip(weights, states, strict=True)).to(t.dtype)
                   if t.is_floating_point() else t.clone()) for name, t in states[0].items()}  # fmt: skip


def merge_vs_ensemble(router: Portland, batches: Sequence[tuple[Sequence[torch.Tensor], object, torch.Tensor]],
                      states: Sequence[Mapping[str, torch.Tensor]], encode: Callable[[dict[str, torch.Tensor], object], torch.Tensor],
                      head: nn.Module, weights_from: Literal["first", "mean"] = "first") -> dict[str, float]:  # fmt: skip
    """Accuracy of ensembling (Σ_k w_k(x) f_k(x) per item) and of merging (θ = Σ_k w_k θ_k per batch, then
    ``encode(θ, inputs)``) on one task's batches of (expert features, raw inputs, labels), and the gap."""
    correct_ensemble = correct_merge = total = 0
    with torch.no_grad():
        for feats, inputs, labels in batches:
            weights = router(feats)
            ensemble = head(sum(weights[:, k : k + 1] * feats[k] for k in range(len(feats))))
            merged = head(encode(merge_states(states, batch_weights(router, feats, weights_from)), inputs))
            correct_ensemble += int((ensemble.argmax(1) == labels).sum())
            correct_merge += int((merged.argmax(1) == labels).sum())
            total += len(labels)
    ensemble_acc, merge_acc = correct_ensemble / total, correct_merge / total
    return {"ensemble": ensemble_acc, "merge": merge_acc, "gap": ensemble_acc - merge_acc}
