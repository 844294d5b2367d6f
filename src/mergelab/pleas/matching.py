"""Step 1 of PLeaS: match the units of model B to those of model A, group by group (algorithms.md §13).

Convention: ``perms[g][i]`` is the unit of B matched to unit i of A, so B's tensors re-indexed with ``perms``
(``spec.permute_state``) line up with A. ``costs[g][i, j]`` is the similarity of A-unit i and B-unit j
(higher = more alike); partial matching keeps the best matched pairs merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.pleas.common import capture, iter_batches
from mergelab.pleas.spec import PermutationSpec

Similarity = Literal["distance", "correlation"]


@dataclass(frozen=True)
class Matching:
    """Per-group permutation of B onto A and the similarity matrix it maximises."""

    perms: Mapping[str, torch.Tensor]
    costs: Mapping[str, torch.Tensor]

    def matched_scores(self, group: str) -> torch.Tensor:
        """``costs[g][i, perms[g][i]]`` for every A-unit i."""
        perm = self.perms[group]
        return self.costs[group][torch.arange(len(perm)), perm]


def solve_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Hungarian assignment maximising ``Σ_i cost[i, perm[i]]`` (scipy ``linear_sum_assignment``)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy(), maximize=True)  # deliberate: SciPy
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """[batch, units, *spatial] → [units, batch·spatial] in float64."""
    return z.transpose(0, 1).reshape(z.shape[1], -1).double()


def activation_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
    max_batches: int | None = None,
    similarity: Similarity = "distance",
) -> dict[str, torch.Tensor]:
    """Per-group A×B similarity of unit activations, summed over the group's nodes.

    ``distance``: C[i, j] = −Σ_batches ‖z^A_i − z^B_j‖₂ with z flattened over batch × spatial (the PLeaS
    default). ``correlation``: Pearson correlation over all samples and positions.
    """
    if similarity not in ("distance", "correlation"):
        raise ConfigError(f"unknown similarity '{similarity}'; use 'distance' or 'correlation'")
    node_group = {node: g for g, nodes in spec.nodes.items() for node in nodes}
    names = list(node_group)
    costs: dict[str, torch.Tensor] = {}
    stats: dict[str, list[torch.Tensor]] = {}
    model_a.eval()
    model_b.eval()
    with torch.no_grad(), capture(model_a, names) as acts_a, capture(model_b, names) as acts_b:
        for batch in iter_batches(inputs, batch_size, max_batches):
            model_a(batch)
            model_b(batch)
            for node, group in node_group.items():
                za, zb = _unit_rows(acts_a[node]), _unit_rows(acts_b[node])
                if similarity == "distance":
                    dist = torch.cdist(za, zb)
                    costs[group] = costs.get(group, 0) - dist
                else:
                    update = [
                        za.sum(1),
                        zb.sum(1),
                        (za * za).sum(1),
                        (zb * zb).sum(1),
                        za @ zb.T,
                        torch.tensor(za.shape[1], dtype=torch.float64),
                    ]
                    old = stats.get(node)
                    stats[node] = update if old is None else [o + u for o, u in zip(old, update, strict=True)]
    if similarity == "correlation":
        for node, (sa, sb, qa, qb, cross, n) in stats.items():
            mean_a, mean_b = sa / n, sb / n
            cov = cross / n - torch.outer(mean_a, mean_b)
            std_a = (qa / n - mean_a**2).clamp_min(0).sqrt() + 1e-12
            std_b = (qb / n - mean_b**2).clamp_min(0).sqrt() + 1e-12
            corr = cov / torch.outer(std_a, std_b)
            group = node_group[node]
            costs[group] = costs.get(group, 0) + corr
    return costs


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
    max_batches: int | None = None,
    similarity: Similarity = "distance",
) -> Matching:
    """Match units by activations on unlabelled ``inputs`` (Hungarian per group)."""
    spec.group_sizes(model_a)
    if spec.group_sizes(model_b) != spec.group_sizes(model_a):
        raise ConfigError("models A and B must have the same architecture and widths to be matched")
    costs = activation_similarity(
        model_a, model_b, spec, inputs, batch_size=batch_size, max_batches=max_batches, similarity=similarity
    )
    return Matching(perms={g: solve_assignment(c) for g, c in costs.items()}, costs=costs)


def _weight_cost(
    group: str,
    spec_axes: list[tuple[str, int]],
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    size: int,
) -> torch.Tensor:
    """Σ over the group's tensors of ⟨W_A[i], W_B[j]⟩ with B's other axes permuted onto A."""
    cost = torch.zeros(size, size, dtype=torch.float64)
    for name, axis in spec_axes:
        wa, wb = state_a[name], state_b[name]
        for other_axis, other in enumerate(spec.axes[name]):
            if other is not None and other_axis != axis:
                wb = wb.index_select(other_axis, perms[other])
        wa = wa.movedim(axis, 0).reshape(size, -1)
        wb = wb.movedim(axis, 0).reshape(size, -1)
        cost += wa @ wb.T
    return cost


def weight_matching(
    model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, *, max_iter: int = 100, seed: int = 0
) -> Matching:
    """Git Re-Basin weight matching: coordinate ascent over groups in a seeded random order, each step a
    Hungarian assignment on weight inner products, until no group improves (or ``max_iter`` sweeps).

    Only parameters (not batch-norm running statistics) enter the inner products.
    """
    sizes = spec.group_sizes(model_a)
    if spec.group_sizes(model_b) != sizes:
        raise ConfigError("models A and B must have the same architecture and widths to be matched")
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    params = {name for name, _ in model_a.named_parameters()}
    state_a = {k: v.detach().double() for k, v in model_a.state_dict().items() if k in spec.axes}
    state_b = {k: v.detach().double() for k, v in model_b.state_dict().items() if k in spec.axes}
    axes = {g: [(n, a) for n, a in pairs if n in params] for g, pairs in spec.perm_to_axes().items()}
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    rng = np.random.default_rng(seed)
    groups = list(spec.groups)
    for _ in range(max_iter):
        progress = False
        for idx in rng.permutation(len(groups)):
            group = groups[idx]
            cost = _weight_cost(group, axes[group], state_a, state_b, spec, perms, sizes[group])
            new = solve_assignment(cost)
            rows = torch.arange(sizes[group])
            old_score, new_score = cost[rows, perms[group]].sum(), cost[rows, new].sum()
            if new_score > old_score + 1e-12 * max(1.0, abs(float(old_score))):
                progress = True
                perms[group] = new
        if not progress:
            break
    costs = {g: _weight_cost(g, axes[g], state_a, state_b, spec, perms, sizes[g]) for g in groups}
    return Matching(perms=perms, costs=costs)


def identity_matching(model: nn.Module, spec: PermutationSpec) -> Matching:
    """No permutation (plain weight averaging); all costs zero, so partial splits keep index order."""
    sizes = spec.group_sizes(model)
    return Matching(
        perms={g: torch.arange(n) for g, n in sizes.items()},
        costs={g: torch.zeros(n, n, dtype=torch.float64) for g, n in sizes.items()},
    )
