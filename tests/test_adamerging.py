"""AdaMerging: entropy decreases on a toy problem; zero steps is task arithmetic at the init; ++ runs."""

from __future__ import annotations

import torch
from torch import nn

from mergelab.learned.adamerging import adamerging, entropy, ties_selected


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    heads = [nn.Linear(8, 3) for _ in range(2)]
    batches = [[{"input": torch.randn(16, 4)} for _ in range(2)] for _ in range(2)]
    return model, base, experts, heads, batches


def _features(output: torch.Tensor, batch: object) -> torch.Tensor:
    return output


def test_adamerging_lowers_the_entropy():
    model, base, experts, heads, batches = _toy()
    merged, losses = adamerging(model, _features, base, experts, heads, batches, steps=60, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05
    assert set(merged) == set(base)


def test_zero_steps_is_task_arithmetic_at_the_init():
    model, base, experts, heads, batches = _toy(1)
    merged, _ = adamerging(model, _features, base, experts, heads, batches, steps=0, init=0.3, granularity="task")
    for name in base:
        expected = base[name] + 0.3 * sum(e[name] - base[name] for e in experts)
        torch.testing.assert_close(merged[name], expected)


def test_plus_variant_uses_sign_agreeing_trimmed_vectors():
    taus = [torch.tensor([1.0, -0.1, 0.5, 0.0]), torch.tensor([-2.0, 0.2, 0.4, 0.1])]
    # TIES rule: κ = 2nd smallest |τ| (P − ⌊0.5·4⌋), keep |τ| ≥ κ: τ̂1 = [1, −0.1, 0.5, 0], τ̂2 = [−2, 0.2, 0.4, 0];
    # elected signs of the sum [−1, 0.1, 0.9, 0] = [−, +, +, 0]; keep the agreeing entries
    selected = ties_selected(taus, density=0.5)
    assert selected[0].tolist() == [0.0, 0.0, 0.5, 0.0]
    assert torch.allclose(selected[1], torch.tensor([-2.0, 0.2, 0.4, 0.0]))
    model, base, experts, heads, batches = _toy(2)
    merged, losses = adamerging(model, _features, base, experts, heads, batches, steps=5, plus=True)
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_entropy_of_uniform_and_confident_logits():
    assert abs(float(entropy(torch.zeros(2, 4))) - float(torch.log(torch.tensor(4.0)))) < 1e-6
    assert float(entropy(torch.tensor([[100.0, 0.0]]))) < 1e-6
