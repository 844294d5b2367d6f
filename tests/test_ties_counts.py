"""The two TIES trim rules, pinned on hand-checked examples.

* ``scope="per_tensor"``: mergekit 0.1.5 ``sparsify.magnitude`` keeps exactly max(1, int(density·n)) entries of
  each tensor; where ties straddle the cut, the lowest indices (``tie_break="index"``, a stable descending sort)
  or the first ones of ``torch.argsort(|τ|, descending=True)`` (``tie_break="argsort"``, mergekit's own order).
* ``scope="global"``: FusionBench ``topk_values_mask`` keeps |τ| ≥ κ, κ the (P − int(density·P))-th smallest
  |τ| over all merged tensors: ⌊density·P⌋ + 1 entries without ties, and every entry tied with κ.
"""

from __future__ import annotations

import pytest
import torch

from mergelab.merging import ops
from mergelab.merging.methods.ties import Ties, TiesParams


def drive(method: Ties, base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]]):
    """Every statistics pass over every tensor, then one merge call per tensor (fresh copies, as the engine)."""
    names = list(base)
    for pass_index in range(method.num_stat_passes()):
        for name in names:
            method.observe(pass_index, name, base[name].clone(), [m[name].clone() for m in models])
        method.end_pass(pass_index)
    return {n: method.merge_tensor(n, base[n].clone(), [m[n].clone() for m in models]) for n in names}


def mergekit_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5 ``sparsify.magnitude``'s mask, written as its code reads."""
    if density >= 1:
        return torch.ones(values.shape, dtype=torch.bool)
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    if density > 0 and values.numel():
        k = max(1, int(density * values.numel()))
        mask[torch.argsort(values.abs().reshape(-1).float(), descending=True)[:k]] = True
    return mask.reshape(values.shape)


def fusionbench_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """FusionBench ``topk_values_mask`` on one flat vector, written as its code reads."""
    d = values.numel()
    kth = values.abs().kthvalue(d - int(d * density)).values
    return values.abs() >= kth


# ------------------------------------------------------------------------------------------ per-tensor count


@pytest.mark.parametrize(
    ("n", "density", "count"),
    [
        (10, 0.3, 3),
        (24, 0.3, 7),  # 7.2 → 7
        (3, 0.3, 1),  # int(0.9) = 0 → at least one entry (PEFT's magnitude_based_pruning would keep 0)
        (1, 0.3, 1),  # int(0.3) = 0 → the single entry is kept
        (5, 0.1, 1),
        (2, 0.5, 1),
        (10, 0.7, 7),  # 0.7·10 = 7.000000000000001 → 7
        (100, 0.29, 28),  # 0.29·100 = 28.999999999999996 → 28: Python float, truncated, as mergekit
        (7, 1.0, 7),  # density ≥ 1: everything
        (7, 0.0, 0),  # density ≤ 0: nothing
        (0, 0.3, 0),  # empty tensor
    ],
)
def test_per_tensor_keep_count_is_mergekits(n, density, count):
    assert ops.magnitude_keep_count(n, density) == count


def test_per_tensor_keep_count_differs_from_the_global_rule_on_small_tensors():
    # global: keep |τ| ≥ (P − ⌊dP⌋)-th smallest → ⌊dP⌋ + 1; per tensor: max(1, ⌊dP⌋)
    for n, global_kept, tensor_kept in [(10, 4, 3), (3, 1, 1), (4, 2, 1), (1, 1, 1), (20, 7, 6)]:
        assert n - ops.trim_rank(n, 0.3) + 1 == global_kept
        assert ops.magnitude_keep_count(n, 0.3) == tensor_kept


def test_top_magnitude_threshold_without_ties_at_the_cut():
    values = torch.tensor([3.0, -2.0, 1.0, 1.0, 0.5, -0.25])
    assert ops.top_magnitude_threshold(values, 2).item() == 2.0  # {3, -2}
    assert ops.top_magnitude_threshold(values, 4).item() == 1.0  # {3, -2, 1, 1}: both 1s fit
    assert ops.top_magnitude_threshold(values, 3) is None  # one of the two 1s: ties straddle the cut
    assert ops.top_magnitude_mask(values, 4).tolist() == [True, True, True, True, False, False]
    assert ops.top_magnitude_mask(values, 0).tolist() == [False] * 6
    assert ops.top_magnitude_mask(values, 6).tolist() == [True] * 6


def stable_order_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` entries of a stable descending sort of |x| (ties: lowest index first)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    order = torch.sort(values.abs().reshape(-1), descending=True, stable=True).indices
    mask[order[:count]] = True
    return mask.reshape(values.shape)


def test_ties_at_the_cut_keep_exactly_count_in_mergekits_argsort_order():
    values = torch.tensor([3.0, 1.0, -1.0, 1.0, 0.5, -1.0])  # four |1|s compete for 2 places
    mask = ops.top_magnitude_mask(values, 3, tie_break="argsort")
    assert int(mask.sum()) == 3 and bool(mask[0]) and not bool(mask[4])
    assert torch.equal(mask, mergekit_mask(values, 0.5))
    expected = values * mergekit_mask(values, 0.5)
    assert torch.equal(ops.keep_top_magnitudes_(values.clone(), 3, tie_break="argsort"), expected)


def test_ties_at_the_cut_keep_the_lowest_indices_by_default():
    values = torch.tensor([3.0, 1.0, -1.0, 1.0, 0.5, -1.0])  # four |1|s compete for 2 places: indices 1 and 2 win
    assert ops.top_magnitude_mask(values, 3).tolist() == [True, True, True, False, False, False]
    assert ops.keep_top_magnitudes_(values.clone(), 3).tolist() == [3.0, 1.0, -1.0, 0.0, 0.0, 0.0]
    # the tied entries spread over chunks of 2: the quota carries over (one |1| left after the first chunk)
    assert ops.keep_top_magnitudes_(values.clone(), 3, chunk=2).tolist() == [3.0, 1.0, -1.0, 0.0, 0.0, 0.0]
    assert ops.keep_top_magnitudes_(values.clone(), 4, chunk=2).tolist() == [3.0, 1.0, -1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("n", [1, 2, 3, 9, 31, 200, 4099])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.3, 0.5, 0.99, 1.0])
def test_selection_equals_mergekit_on_heavily_tied_tensors(n, density):
    generator = torch.Generator().manual_seed(n)
    values = torch.round(torch.randn(n, generator=generator) * 3) / 4  # few distinct magnitudes, ±0
    values[: min(n, 2)] = -0.0
    expected = mergekit_mask(values, density)
    count = ops.magnitude_keep_count(n, density)
    assert int(expected.sum()) == count
    assert torch.equal(ops.top_magnitude_mask(values, count, tie_break="argsort"), expected)
    assert torch.equal(ops.keep_top_magnitudes_(values.clone(), count, chunk=64, tie_break="argsort"),
                       values * expected)  # fmt: skip
    stable = stable_order_mask(values, count)  # the default rule: a stable sort's order, same count and magnitudes
    assert torch.equal(ops.top_magnitude_mask(values, count), stable)
    assert torch.equal(ops.keep_top_magnitudes_(values.clone(), count, chunk=64), values * stable)
    assert sorted(values[stable].abs().tolist()) == sorted(values[expected].abs().tolist())


def test_selection_of_a_non_contiguous_tensor_is_in_place():
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3] view, not contiguous
    kept = ops.keep_top_magnitudes_(values, 2)
    assert kept.data_ptr() == values.data_ptr()
    assert int((values != 0).sum()) == 2 and sorted(values[values != 0].tolist()) == [10.0, 11.0]


def test_magnitude_cut_counts_the_entries_above_and_tied_with_kappa():
    generator = torch.Generator().manual_seed(0)
    values = torch.round(torch.randn(3000, generator=generator) * 5) / 8
    values[:5] = -0.0
    magnitudes = values.abs()
    for count in [1, 2, 17, 1500, 2999]:
        kappa, greater, tied = ops.magnitude_cut(values, count)
        assert kappa == magnitudes.kthvalue(3000 - count + 1).values
        assert greater == int((magnitudes > kappa).sum()) and tied == int((magnitudes == kappa).sum())
        assert greater < count <= greater + tied


# ------------------------------------------------------------------------------------------ through Ties


def test_one_model_per_tensor_keeps_floor_dn_and_global_keeps_floor_dp_plus_one():
    # one tensor of 10 distinct magnitudes, one model, λ = 1, density 0.3
    tau = torch.tensor([0.125, -0.25, 0.375, -0.5, 0.625, -0.75, 0.875, -1.0, 1.125, -1.25])
    base = {"w": torch.zeros(10)}
    models = [{"w": tau.clone()}]
    per_tensor = drive(Ties(TiesParams(density=0.3, scope="per_tensor", scale=1.0), 1), base, models)["w"]
    assert per_tensor.tolist() == [0.0] * 7 + [-1.0, 1.125, -1.25]  # int(3.0) = 3 kept
    global_ = drive(Ties(TiesParams(density=0.3, scope="global", scale=1.0), 1), base, models)["w"]
    assert global_.tolist() == [0.0] * 6 + [0.875, -1.0, 1.125, -1.25]  # κ = 7th smallest → ⌊3⌋ + 1 = 4 kept
    assert torch.equal(global_ != 0, fusionbench_mask(tau, 0.3))


def test_global_rule_keeps_every_entry_tied_with_kappa_as_fusionbench():
    # P = 8 over two tensors, density 0.25: κ = the (8 − 2) = 6th smallest |τ| = 1 → all four |1|s kept, 5 in all
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    tau = {"a": torch.tensor([1.0, -1.0, 0.5, 2.0]), "b": torch.tensor([1.0, 0.25, -1.0, 0.0])}
    method = Ties(TiesParams(density=0.25, scope="global", scale=1.0), 1)
    got = drive(method, base, [tau])
    assert method.thresholds.tolist() == [1.0]
    assert got["a"].tolist() == [1.0, -1.0, 0.0, 2.0] and got["b"].tolist() == [1.0, 0.0, -1.0, 0.0]
    flat = torch.cat([tau["a"], tau["b"]])
    assert torch.equal(torch.cat([got["a"], got["b"]]) != 0, fusionbench_mask(flat, 0.25))
    # the same tensors per tensor: max(1, int(0.25·4)) = 1 per tensor → a keeps 2; b keeps one of its |1|s
    per_tensor = drive(Ties(TiesParams(density=0.25, scope="per_tensor", scale=1.0), 1), base, [tau])
    assert per_tensor["a"].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert int((per_tensor["b"] != 0).sum()) == 1
    assert torch.equal(per_tensor["b"] != 0, mergekit_mask(tau["b"], 0.25))


def test_zero_sign_sums_go_to_plus_per_tensor_and_to_the_majority_globally():
    # two models, density 1: column 0 cancels exactly (Σ = 0); the other columns vote − (majority −)
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([0.5, -1.0, -1.0, -1.0])}, {"w": torch.tensor([-0.5, -1.0, -1.0, -1.0])}]
    per_tensor = drive(Ties(TiesParams(density=1.0, scope="per_tensor", scale=1.0), 2), base, models)["w"]
    assert per_tensor.tolist() == [0.5, -2.0, -2.0, -2.0]  # mergekit: γ = + where Σ ≥ 0
    global_ = drive(Ties(TiesParams(density=1.0, scope="global", scale=1.0), 2), base, models)["w"]
    assert global_.tolist() == [-0.5, -2.0, -2.0, -2.0]  # FusionBench: γ = 0 → majority sign (−)


@pytest.mark.parametrize("grid", [True, False])
@pytest.mark.parametrize("scale", [0.3, [1.0, -0.5, 2.0]])
@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_global_counting_pass_equals_the_exact_radix_passes(monkeypatch, grid, scale, disjoint):
    import mergelab.merging.methods.ties as ties_module

    generator = torch.Generator().manual_seed(11)
    base = {n: torch.round(torch.randn(s, generator=generator) * 8) / 8 for n, s in [("a", (40, 30)), ("b", (77,))]}
    step = (lambda x: torch.round(x * 4) / 8) if grid else (lambda x: x / 8)  # a 1/8 grid: ties with κ, exact cancels
    models = [{n: t + step(torch.randn(t.shape, generator=generator)) for n, t in base.items()} for _ in range(3)]
    params = TiesParams(density=0.3, scope="global", disjoint=disjoint, scale=scale)
    bracketed = Ties(params, 3)
    got = drive(bracketed, base, models)
    assert not bracketed._bracket_failed and not bracketed.pass_needed(2)  # the sample's bracket held
    taus = torch.stack([torch.cat([(m[n] - base[n]).reshape(-1) for n in base]) for m in models])
    if grid:
        assert bool((taus.abs() == bracketed.thresholds.unsqueeze(1)).any(1).all())  # every κ_t has ties
    monkeypatch.setattr(ties_module, "DEFER_BYTES", 0)  # nothing may be held: the exact passes run
    exact = Ties(params, 3)
    expected = drive(exact, base, models)
    assert exact._bracket_failed and exact.pass_needed(2) is False  # ran, then settled
    assert exact._majority == bracketed._majority and exact._sign_total == bracketed._sign_total
    assert torch.equal(exact.thresholds, bracketed.thresholds)
    assert all(torch.equal(got[n], expected[n]) for n in base)


def test_global_bracket_that_misses_kappa_falls_back_to_the_exact_passes(monkeypatch):
    from mergelab.merging.ops import Bracket

    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(50, 20, generator=generator)}
    models = [{"w": base["w"] + torch.randn(50, 20, generator=generator) * 0.1} for _ in range(3)]
    params = TiesParams(density=0.2, scope="global")
    expected = drive(Ties(params, 3), base, models)
    monkeypatch.setattr(Bracket, "guess", classmethod(lambda cls, sample, keep: cls(10.0, 11.0)))  # far above κ
    missed = Ties(params, 3)
    got = drive(missed, base, models)
    assert missed._bracket_failed
    assert torch.equal(got["w"], expected["w"])


@pytest.mark.parametrize("kind", ["continuous", "grid", "zeros"])
@pytest.mark.parametrize("disjoint", ["sum", "mean"])
@pytest.mark.parametrize("tie_break", ["index", "argsort"])
def test_per_tensor_one_pass_bracket_equals_the_exact_selection(monkeypatch, kind, disjoint, tie_break):
    import mergelab.merging.methods.ties as ties_module

    generator = torch.Generator().manual_seed(7)
    n = ties_module.BRACKET_MIN + 4463
    base = torch.randn(n, generator=generator)
    deltas = [torch.randn(n, generator=generator) * 0.01 for _ in range(3)]
    if kind == "grid":  # many |τ| tie with κ_t and sums cancel exactly
        deltas = [torch.round(d * 300) / 300 for d in deltas]
    if kind == "zeros":  # frozen entries: τ = 0 exactly for 40 %
        deltas = [d.masked_fill(torch.rand(n, generator=generator) < 0.4, 0.0) for d in deltas]
    models = [base + d for d in deltas]
    params = TiesParams(scope="per_tensor", density=0.2, disjoint=disjoint, scale=[0.3, 1.0, 0.7], tie_break=tie_break)
    used = []
    original = Ties._merge_bracketed
    monkeypatch.setattr(Ties, "_merge_bracketed", lambda self, *a: used.append(original(self, *a)) or used[-1])
    one_pass = Ties(params, 3).merge_tensor("w", base, models)
    if kind != "grid":
        assert used[-1] is not None  # the sampled brackets held: one pass, no selection
    monkeypatch.setattr(ties_module, "BRACKET_MIN", 1 << 40)  # the exact selection, then the merge
    exact = Ties(params, 3).merge_tensor("w", base, models)
    assert torch.equal(one_pass.view(torch.int32), exact.view(torch.int32))


def test_the_global_sample_never_samples_a_tensor_past_its_cap():
    """StridedSample: a first tensor larger than the cap raises the stride before it is sampled; a later one that
    would pass the cap first thins what is held (every other value) and doubles the stride."""
    from mergelab.merging.methods.ties import StridedSample

    base = torch.zeros(1000)
    first, second = torch.arange(1000.0), -torch.arange(1000.0, 2000.0)
    sample = StridedSample(rows=1, cap=100)
    sample.add([ops.TaskRow(first, base)])
    assert sample.stride == 16 and torch.equal(sample.values(0), first[::16])  # 63 values: 1000/8 = 125 > 100
    sample.add([ops.TaskRow(second, base)])
    assert sample.stride == 32 and sample.size == 32 + 32
    assert torch.equal(sample.values(0), torch.cat([first[::16][::2], second.abs()[::32]]))
