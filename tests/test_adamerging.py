"""AdaMerging: entropy decreases on a toy problem; zero steps is task arithmetic at the init; ++ learns its
coefficients on the TIES-selected vectors (hand-checked)."""

from __future__ import annotations

import torch
from torch import nn

from mergelab.learned.adamerging import adamerging, entropy
from mergelab.merging.ops import ties_selected_vectors


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
    taus = [{"w": torch.tensor([1.0, -0.1, 0.5, 0.0])}, {"w": torch.tensor([-2.0, 0.2, 0.4, 0.1])}]
    # TIES rule: κ = 2nd smallest |τ| (P − ⌊0.5·4⌋), keep |τ| ≥ κ: τ̂1 = [1, −0.1, 0.5, 0], τ̂2 = [−2, 0.2, 0.4, 0];
    # elected signs of the sum [−1, 0.1, 0.9, 0] = [−, +, +, 0]; keep the agreeing entries
    selected = ties_selected_vectors(taus, density=0.5)
    assert selected[0]["w"].tolist() == [0.0, 0.0, 0.5, 0.0]
    assert torch.allclose(selected[1]["w"], torch.tensor([-2.0, 0.2, 0.4, 0.0]))


def test_plus_at_its_init_is_the_base_plus_init_times_the_ties_selected_vectors():
    model, base, experts, heads, batches = _toy(2)
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    selected = ties_selected_vectors(taus, density=0.4)
    merged, _ = adamerging(model, _features, base, experts, heads, batches, steps=0, init=0.3, granularity="task",
                           plus=True, density=0.4)  # fmt: skip
    for name in base:
        expected = base[name] + 0.3 * (selected[0][name] + selected[1][name])
        torch.testing.assert_close(merged[name], expected)
        kept = (selected[0][name] != 0) | (selected[1][name] != 0)
        assert torch.equal(merged[name][~kept], base[name][~kept])  # trimmed or disagreeing entries stay at θ₀
    plain, _ = adamerging(model, _features, base, experts, heads, batches, steps=0, init=0.3, granularity="task")
    assert any(not torch.allclose(merged[n], plain[n]) for n in base)  # ++ is not plain task arithmetic


def test_plus_learns_one_coefficient_per_task_on_the_selected_vectors():
    model, base, experts, heads, batches = _toy(3)
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    selected = ties_selected_vectors(taus, density=0.4)
    merged, losses = adamerging(model, _features, base, experts, heads, batches, steps=20, lr=5e-2,
                                granularity="task", plus=True, density=0.4)  # fmt: skip
    # θ = θ₀ + λ_1 s_1 + λ_2 s_2 exactly: solve for λ from the merged weights, the fit is exact
    flat = [torch.cat([s[n].reshape(-1) for n in base]) for s in selected]
    delta = torch.cat([(merged[n] - base[n]).reshape(-1) for n in base])
    design = torch.stack(flat, 1).double()
    lam = torch.linalg.lstsq(design, delta.double().unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(design @ lam, delta.double(), atol=1e-5, rtol=0)
    # clamped to [0, 1] (lstsq recovers a clamped λ to within rounding), and learned: not the 0.3 it started from
    assert all(-1e-6 <= float(v) <= 1.0 + 1e-6 for v in lam), lam
    assert not torch.allclose(lam, torch.full((2,), 0.3, dtype=lam.dtype), atol=1e-3), lam
    assert losses[-1] < losses[0]


def test_entropy_of_uniform_and_confident_logits():
    assert abs(float(entropy(torch.zeros(2, 4))) - float(torch.log(torch.tensor(4.0)))) < 1e-6
    assert float(entropy(torch.tensor([[100.0, 0.0]]))) < 1e-6
