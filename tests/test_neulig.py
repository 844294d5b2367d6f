"""NeuLig: the router learns to pick the right expert; for linear encoders merging equals ensembling per item."""

from __future__ import annotations

import torch
from torch import nn

from mergelab.learned.neulig import batch_weights, merge_states, merge_vs_ensemble, standardized_xi, train_router


def _toy():
    torch.manual_seed(0)
    d, n = 4, 200
    a = [torch.eye(d), torch.linalg.qr(torch.randn(d, d))[0]]  # expert k's encoder: x ↦ A_k x
    heads = [nn.Linear(d, 3), nn.Linear(d, 3)]
    shift = torch.zeros(d)
    shift[0] = 3.0
    inputs = [torch.randn(n, d) + shift, torch.randn(n, d) - shift]  # task 0 and task 1 inputs differ
    labels = [heads[t](inputs[t] @ a[t].T).argmax(1).detach() for t in range(2)]  # expert t is right on task t
    features = [[inputs[t] @ a[k].T for k in range(2)] for t in range(2)]
    states = [{"A": a[0]}, {"A": a[1]}]
    return a, heads, inputs, labels, features, states


def test_router_learns_to_pick_the_right_expert():
    _, heads, _, labels, features, states = _toy()
    router = train_router(features, labels, heads, standardized_xi(states), loss="ce", steps=300, lr=1e-2)
    for task in range(2):
        weights = batch_weights(router, features[task], "mean")
        assert weights[task] > 0.8, (task, weights)


def test_merging_equals_ensembling_for_linear_encoders_per_item():
    a, heads, inputs, labels, features, states = _toy()
    router = train_router(features, labels, heads, standardized_xi(states), loss="entropy", steps=50, lr=1e-2)

    def encode(state, x):
        return x @ state["A"].T

    items = [([f[i : i + 1] for f in features[0]], inputs[0][i : i + 1], labels[0][i : i + 1]) for i in range(50)]
    result = merge_vs_ensemble(router, items, states, encode, heads[0], weights_from="first")
    assert result["gap"] == 0.0 and result["merge"] == result["ensemble"]


def test_xi_is_standardised_and_merge_is_convex():
    states = [{"w": torch.ones(3), "i": torch.arange(2)}, {"w": 3 * torch.ones(3), "i": torch.arange(2)}]
    xi = standardized_xi(states)
    assert torch.allclose(xi.mean(), torch.tensor(0.0)) and torch.allclose(xi.std(), torch.tensor(1.0))
    merged = merge_states(states, torch.tensor([0.25, 0.75]))
    assert torch.allclose(merged["w"], torch.full((3,), 2.5)) and torch.equal(merged["i"], torch.arange(2))
