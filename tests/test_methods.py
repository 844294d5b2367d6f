"""Every weight-space merging method against an independent whole-vector reference, plus invariants, hand-checked
TIES examples and parameter validation. Methods are driven like the engine does, with in-memory tensors."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from mergelab.api.registry import build_method, list_methods
from mergelab.core.errors import ConfigError, MergelabError
from mergelab.merging import ops
from mergelab.merging.base import MergeMethod
from mergelab.merging.methods.cart import Cart, CartParams
from mergelab.merging.methods.dare import Dare, DareParams
from mergelab.merging.methods.magmax import MagMax, MagMaxParams
from mergelab.merging.methods.model_stock import ModelStock, ModelStockParams
from mergelab.merging.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams
from mergelab.merging.methods.ties import Ties, TiesParams
from mergelab.merging.methods.weight_average import WeightAverage, WeightAverageParams
from mergelab.merging.spec import describe_params

State = dict[str, torch.Tensor]

SHAPES = {
    "enc.layer.0.attention.self.query.weight": (6, 5),
    "enc.layer.0.attention.self.query.bias": (6,),
    "enc.layer.0.intermediate.dense.weight": (8, 6),
    "enc.layer.0.LayerNorm.weight": (6,),
    "embeddings.patch.weight": (3, 4, 2),
    "logit_scale": (),
}
LOWRANK = {"enc.layer.0.attention.self.query.weight", "enc.layer.0.intermediate.dense.weight"}


def make_states(seed: int = 0, num_models: int = 3, quantised: bool = False) -> tuple[State, list[State]]:
    """A random base and ``num_models`` fine-tunes (base + small task vectors). ``quantised`` task vectors are
    multiples of 1/8, so magnitudes tie and sign sums cancel exactly."""
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    models = []
    for _ in range(num_models):
        model = {}
        for name, shape in SHAPES.items():
            tau = 0.1 * torch.randn(shape, generator=generator)
            if quantised:
                tau = torch.round(tau * 80) / 8
            model[name] = base[name] + tau
        models.append(model)
    return base, models


def drive(method: MergeMethod, base: State | None, models: list[State]) -> State:
    """What the engine does: every statistics pass over every tensor, then one merge call per tensor."""
    names = list(models[0])

    def base_of(name: str) -> torch.Tensor | None:  # fresh copies: methods own (and may overwrite) their inputs
        return base[name].clone() if (base is not None and method.spec.needs_base) else None

    def models_of(name: str) -> list[torch.Tensor]:
        return [m[name].clone() for m in models]

    for pass_index in range(method.num_stat_passes()):
        for name in names:
            method.observe(pass_index, name, base_of(name), models_of(name))
        method.end_pass(pass_index)
    return {name: method.merge_tensor(name, base_of(name), models_of(name)) for name in names}


def assert_states_close(got: State, expected: State, atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=0, msg=name)


# --------------------------------------------------------------------------------------- naive references


def naive_taus(base: State, models: list[State]) -> dict[str, list[torch.Tensor]]:
    return {name: [m[name] - base[name] for m in models] for name in base}


def naive_ta_delta(taus: dict[str, list[torch.Tensor]], scales: list[float]) -> State:
    return {name: sum(s * t for s, t in zip(scales, ts, strict=True)) for name, ts in taus.items()}


def naive_ties_vector(v: torch.Tensor, density: float, disjoint: str, scales: list[float]) -> torch.Tensor:
    """algorithms.md §3 pseudo-code on a T×P matrix; distinct per-model scales are applied before the election."""
    p = v.shape[1]
    k = p - int(density * p)
    if k >= 1:
        thr = v.abs().kthvalue(k, dim=1, keepdim=True).values
        v = v * (v.abs() >= thr)
    uniform = len(set(scales)) == 1
    if not uniform:
        v = v * torch.tensor(scales).unsqueeze(1)
    gamma = v.sum(0).sign()
    gamma[gamma == 0] = gamma.sum().sign()
    keep = ((v > 0) & (gamma > 0)) | ((v < 0) & (gamma < 0))
    merged = (v * keep).sum(0)
    if disjoint == "mean":
        merged = merged / keep.sum(0).clamp(min=1)
    return scales[0] * merged if uniform else merged


def naive_mergekit_ties_tensor(ts: list[torch.Tensor], density: float, disjoint: str, scales: list[float]):
    """mergekit 0.1.5 ``ties`` on one tensor, as its code reads: keep the first max(1, int(density·n)) entries of
    argsort(|τ|, descending) (all for density ≥ 1, none for ≤ 0), multiply by the weights, γ = +1 where the
    sum is ≥ 0, keep sign(τ̂) == γ, sum (``normalize`` false) or divide by the kept count (true, equal weights)."""
    rows = []
    for tau in ts:
        w = tau.reshape(-1)
        if density >= 1:
            rows.append(w)
            continue
        mask = torch.zeros_like(w)
        if density > 0:
            mask[torch.argsort(w.abs(), descending=True)[: max(1, int(density * w.numel()))]] = 1
        rows.append(w * mask)
    v = torch.stack(rows) * torch.tensor(scales).unsqueeze(1)
    gamma = (v.sum(0) >= 0).float() * 2 - 1
    keep = (v.sign() == gamma).float()
    merged = (v * keep).sum(0)
    if disjoint == "mean":
        count = keep.sum(0)
        count[count == 0] = 1
        merged = merged / count
    return merged.reshape(ts[0].shape)


def mergekit_ties(scope: str) -> dict[str, str]:
    """Per tensor, mergekit's own tie order at the cut (the quantised states tie there)."""
    return {"tie_break": "argsort"} if scope == "per_tensor" else {}


def naive_ties_delta(taus: dict[str, list[torch.Tensor]], density, scope, disjoint, scales) -> State:
    if scope == "per_tensor":
        return {n: naive_mergekit_ties_tensor(ts, density, disjoint, scales) for n, ts in taus.items()}
    names = list(taus)
    flat = {n: torch.stack([t.reshape(-1) for t in taus[n]]) for n in names}
    out = {}
    merged = naive_ties_vector(torch.cat([flat[n] for n in names], dim=1), density, disjoint, scales)
    offset = 0
    for n in names:
        size = flat[n].shape[1]
        out[n] = merged[offset : offset + size].reshape(taus[n][0].shape)
        offset += size
    return out


def plus(base: State, delta: State) -> State:
    return {n: base[n] + delta[n] for n in base}


# --------------------------------------------------------------------------------------- references per method


def test_weight_average_matches_reference_equal_and_weighted():
    base, models = make_states(1)
    expected = {n: sum(m[n] for m in models) / 3 for n in base}
    assert_states_close(drive(WeightAverage(WeightAverageParams(), 3), None, models), expected)
    weighted = WeightAverage(WeightAverageParams(weights=[1.0, 2.0, 1.0]), 3)
    expected = {n: 0.25 * models[0][n] + 0.5 * models[1][n] + 0.25 * models[2][n] for n in base}
    assert_states_close(drive(weighted, base, models), expected)


@pytest.mark.parametrize("scale", [0.3, [0.2, -0.5, 1.0]])
def test_task_arithmetic_matches_reference(scale):
    base, models = make_states(2)
    scales = [scale] * 3 if isinstance(scale, float) else scale
    expected = plus(base, naive_ta_delta(naive_taus(base, models), scales))
    assert_states_close(drive(TaskArithmetic(TaskArithmeticParams(scale=scale), 3), base, models), expected)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("disjoint", ["sum", "mean"])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("quantised", [False, True])
def test_ties_matches_whole_vector_reference(scope, disjoint, density, quantised):
    base, models = make_states(3, quantised=quantised)
    method = Ties(TiesParams(density=density, scope=scope, disjoint=disjoint, scale=0.3, **mergekit_ties(scope)), 3)
    expected = plus(base, naive_ties_delta(naive_taus(base, models), density, scope, disjoint, [0.3] * 3))
    assert_states_close(drive(method, base, models), expected)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_per_model_scales_are_applied_before_the_election(scope):
    base, models = make_states(4, quantised=True)
    scales = [1.0, -0.5, 2.0]
    method = Ties(TiesParams(density=0.3, scope=scope, disjoint="mean", scale=scales, **mergekit_ties(scope)), 3)
    expected = plus(base, naive_ties_delta(naive_taus(base, models), 0.3, scope, "mean", scales))
    assert_states_close(drive(method, base, models), expected)


def test_ties_global_thresholds_equal_kthvalue_of_the_concatenation():
    base, models = make_states(5, num_models=4, quantised=True)
    method = Ties(TiesParams(density=0.2), 4)
    drive(method, base, models)
    flat = torch.cat([torch.stack([m[n] - base[n] for m in models]).reshape(4, -1) for n in base], dim=1).abs()
    k = flat.shape[1] - math.floor(0.2 * flat.shape[1])
    assert torch.equal(method.thresholds, flat.kthvalue(k, dim=1).values)


def test_ties_global_refuses_to_merge_without_its_statistics_passes():
    base, models = make_states(6)
    method = Ties(TiesParams(), 3)
    name = "logit_scale"
    with pytest.raises(MergelabError, match="statistics passes"):
        method.merge_tensor(name, base[name], [m[name] for m in models])


def dare_reference(base, models, drop_rate, seed, targets, rescale=True) -> dict[str, list[torch.Tensor]]:
    """τ̃ with the spec'd deterministic mask (ops.dare_keep_mask), dropped and rescaled by hand."""
    taus = naive_taus(base, models)
    out = {}
    for name, ts in taus.items():
        if targets == "weights_2d" and ts[0].dim() != 2:
            out[name] = ts
            continue
        dropped = []
        for index, tau in enumerate(ts):
            keep = ops.dare_keep_mask(tau.shape, drop_rate, seed, index, name).float()
            dropped.append(tau * keep / (1 - drop_rate) if rescale else tau * keep)
        out[name] = dropped
    return out


@pytest.mark.parametrize("targets", ["all", "weights_2d"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_task_arithmetic_matches_reference(targets, rescale):
    base, models = make_states(7)
    params = DareParams(drop_rate=0.4, seed=3, targets=targets, rescale=rescale, then="task_arithmetic")
    expected = plus(base, naive_ta_delta(dare_reference(base, models, 0.4, 3, targets, rescale), [0.3] * 3))
    assert_states_close(drive(Dare(params, 3), base, models), expected)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_dare_ties_matches_reference(scope, disjoint):
    base, models = make_states(8)
    params = DareParams(drop_rate=0.5, seed=1, then="ties", scope=scope, disjoint=disjoint, density=0.3)
    taus = dare_reference(base, models, 0.5, 1, "all")
    expected = plus(base, naive_ties_delta(taus, 0.3, scope, disjoint, [0.5] * 3))  # DARE-TIES default λ 0.5
    assert_states_close(drive(Dare(params, 3), base, models), expected)


def test_dare_is_reproducible_and_depends_on_the_seed():
    base, models = make_states(9)
    first = drive(Dare(DareParams(seed=5), 3), base, models)
    again = drive(Dare(DareParams(seed=5), 3), base, models)
    other = drive(Dare(DareParams(seed=6), 3), base, models)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(
        first["enc.layer.0.intermediate.dense.weight"], other["enc.layer.0.intermediate.dense.weight"]
    )


def naive_magmax(base: State, models: list[State], scale: float) -> State:
    out = {}
    for name, ts in naive_taus(base, models).items():
        stacked = torch.stack(ts)
        index = len(ts) - 1 - stacked.flip(0).abs().argmax(0)  # last max wins
        out[name] = base[name] + scale * stacked.gather(0, index.unsqueeze(0)).squeeze(0)
    return out


@pytest.mark.parametrize("quantised", [False, True])
def test_magmax_matches_reference(quantised):
    base, models = make_states(10, quantised=quantised)
    assert_states_close(drive(MagMax(MagMaxParams(), 3), base, models), naive_magmax(base, models, 0.5))


def naive_cart(models: list[State], ratio: float | None, energy: float | None, scale: float) -> State:
    out = {}
    for name in models[0]:
        stacked = torch.stack([m[name] for m in models])
        avg = stacked.mean(0)
        if name not in LOWRANK:
            out[name] = avg
            continue
        total = torch.zeros_like(avg)
        for theta in stacked:
            u, s, vh = torch.linalg.svd(theta - avg, full_matrices=False)
            if energy is None:
                r = max(1, int(ratio * min(avg.shape)))
            else:
                share = (s.double() ** 2).cumsum(0) / (s.double() ** 2).sum()
                r = next(i + 1 for i, v in enumerate(share.tolist()) if v >= energy)
            total += u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        out[name] = avg + scale * total
    return out


@pytest.mark.parametrize(("ratio", "energy"), [(0.12, None), (0.4, None), (0.12, 0.8)])
def test_cart_matches_reference(ratio, energy):
    _, models = make_states(11, num_models=4)
    method = Cart(CartParams(rank_ratio=ratio, energy=energy, scale=2.0), 4)
    assert_states_close(drive(method, None, models), naive_cart(models, ratio, energy, 2.0), atol=2e-6)


def naive_model_stock(base: State, models: list[State]) -> State:
    out = {}
    n = len(models)
    for name in base:
        taus = [(m[name] - base[name]).reshape(-1) for m in models]
        cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(taus, 2)]
        cos = min(max(float(torch.stack(cosines).mean()), 0.0), 1.0)
        t = n * cos / (1 + (n - 1) * cos)
        avg = sum(m[name] for m in models) / n
        out[name] = t * avg + (1 - t) * base[name]
    return out


def test_model_stock_matches_reference():
    base, models = make_states(12, num_models=3)
    # correlated fine-tunes (a shared direction plus noise), so cosines are positive and t is in (0, 1)
    shared = {n: base[n] + 0.2 * (models[0][n] - base[n]) * 4 for n in base}
    models = [{n: shared[n] + (m[n] - base[n]) for n in base} for m in models]
    got = drive(ModelStock(ModelStockParams(), 3), base, models)
    assert_states_close(got, naive_model_stock(base, models))
    name = "enc.layer.0.intermediate.dense.weight"
    assert not torch.allclose(got[name], base[name]) and not torch.allclose(got[name], models[0][name])


def test_model_stock_clamps_negative_cosine_to_the_base():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, 0, 0, 0])}, {"w": torch.tensor([-1.0, 0, 0, 0])}]
    assert torch.equal(drive(ModelStock(ModelStockParams(), 2), base, models)["w"], base["w"])


# --------------------------------------------------------------------------------------- invariants


def test_task_arithmetic_scale_zero_is_the_base():
    base, models = make_states(13)
    got = drive(TaskArithmetic(TaskArithmeticParams(scale=0.0), 3), base, models)
    assert all(torch.equal(got[n], base[n]) for n in base)


def test_weight_average_of_identical_models_is_that_model():
    _, models = make_states(14, num_models=1)
    got = drive(WeightAverage(WeightAverageParams(), 4), None, models * 4)
    assert_states_close(got, models[0])


def test_cart_full_rank_is_the_weight_average():
    _, models = make_states(15)
    got = drive(Cart(CartParams(rank_ratio=1.0), 3), None, models)
    assert_states_close(got, drive(WeightAverage(WeightAverageParams(), 3), None, models))


def test_cart_leaves_non_lowrank_tensors_at_the_average():
    _, models = make_states(16)
    got = drive(Cart(CartParams(), 3), None, models)
    average = drive(WeightAverage(WeightAverageParams(), 3), None, models)
    for name in SHAPES:
        assert torch.equal(got[name], average[name]) == (name not in LOWRANK), name


@pytest.mark.parametrize(
    ("then", "extra", "reference"),
    [
        ("task_arithmetic", {}, lambda: TaskArithmetic(TaskArithmeticParams(scale=0.3), 3)),
        ("ties", {"scope": "global"}, lambda: Ties(TiesParams(scale=0.5, scope="global"), 3)),
        ("ties", {"scope": "per_tensor", "disjoint": "mean"},
         lambda: Ties(TiesParams(scale=0.5, scope="per_tensor", disjoint="mean"), 3)),
    ],
)  # fmt: skip
def test_dare_with_drop_rate_zero_is_its_then_method(then, extra, reference):
    base, models = make_states(17, quantised=True)
    got = drive(Dare(DareParams(drop_rate=0.0, then=then, **extra), 3), base, models)
    expected = drive(reference(), base, models)
    assert all(torch.equal(got[n], expected[n]) for n in base)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_density_one_single_model_sum_is_task_arithmetic(scope):
    base, models = make_states(18, num_models=1, quantised=True)
    got = drive(Ties(TiesParams(density=1.0, scope=scope, disjoint="sum", scale=0.7), 1), base, models)
    expected = drive(TaskArithmetic(TaskArithmeticParams(scale=0.7), 1), base, models)
    assert all(torch.equal(got[n], expected[n]) for n in base)


def test_magmax_tie_goes_to_the_later_model():
    base = {"w": torch.tensor([0.0, 0.0, 0.0])}
    models = [{"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([-1.0, 2.0, 0.5])}]
    got = drive(MagMax(MagMaxParams(scale=1.0), 2), base, models)
    assert got["w"].tolist() == [-1.0, 2.0, 3.0]


def test_model_stock_identical_task_vectors_return_the_fine_tuned_weights():
    base, models = make_states(19, num_models=1)
    got = drive(ModelStock(ModelStockParams(), 3), base, models * 3)  # cos = 1 → t = 1
    assert_states_close(got, models[0])


# --------------------------------------------------------------------------------------- hand-checked TIES


@pytest.mark.parametrize(
    ("scope", "disjoint", "expected"),
    [
        ("global", "sum", [2.0, 4.5, 3.75]),
        ("global", "mean", [2.0, 3.25, 3.75]),
        ("per_tensor", "sum", [2.0, 4.5, 3.0]),
        ("per_tensor", "mean", [2.0, 3.25, 3.0]),
    ],
)
def test_ties_three_element_example_by_hand(scope, disjoint, expected):
    # θ₀ = [1, 2, 3], λ = 0.5, density 0.5, one tensor of P = 3 entries.
    #   τ_1 = [ 2.0, -1.0,  1.5]   τ_2 = [-1.0,  3.0, -1.5]   τ_3 = [-0.5,  2.0, 0.25]
    # global (FusionBench): ⌊1.5⌋ = 1, κ_t = 2nd smallest |τ_t|, keep |τ| ≥ κ (2 of 3 kept)
    #   κ = 1.5, 1.5, 0.5 → τ̂_1 = [2, 0, 1.5], τ̂_2 = [0, 3, -1.5], τ̂_3 = [-0.5, 2, 0]
    #   Σ τ̂ = [1.5, 5, 0] → γ = [+, +, 0]; majority sign(1 + 1 + 0) = + → γ = [+, +, +]
    #   agreeing: col0 {2} col1 {3, 2} col2 {1.5} → sum [2, 5, 1.5], mean [2, 2.5, 1.5]
    #   θ = θ₀ + 0.5·τ_m → sum [2, 4.5, 3.75], mean [2, 3.25, 3.75]
    # per_tensor (mergekit): max(1, int(1.5)) = 1 entry kept per model: τ̂_1 = [2, 0, 0], τ̂_2 = [0, 3, 0],
    #   τ̂_3 = [0, 2, 0]; λ first: [1, 0, 0], [0, 1.5, 0], [0, 1, 0]; Σ = [1, 2.5, 0] → γ = [+, +, +]
    #   sum [1, 2.5, 0] → θ = [2, 4.5, 3]; mean [1, 1.25, 0] → θ = [2, 3.25, 3]
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    taus = [[2.0, -1.0, 1.5], [-1.0, 3.0, -1.5], [-0.5, 2.0, 0.25]]
    models = [{"w": base["w"] + torch.tensor(t)} for t in taus]
    method = Ties(TiesParams(density=0.5, scope=scope, disjoint=disjoint, scale=0.5), 3)
    assert drive(method, base, models)["w"].tolist() == expected
    if scope == "global":
        assert method.thresholds.tolist() == [1.5, 1.5, 0.5]


@pytest.mark.parametrize(
    ("scope", "disjoint", "expected_a", "expected_b"),
    [
        ("global", "sum", [1.0, 1.5, 1.375], [3.0]),
        ("global", "mean", [1.0, 1.25, 1.375], [3.0]),
        ("per_tensor", "sum", [1.0, 1.0, 1.375], [3.0]),
        ("per_tensor", "mean", [1.0, 1.0, 1.375], [3.0]),
    ],
)
def test_ties_two_tensor_example_where_the_scopes_differ(scope, disjoint, expected_a, expected_b):
    # θ₀ = 1 everywhere, λ = 0.5, density 0.5, tensors A (3 entries) and B (1 entry):
    #   τ_1: A = [0.25, 0.5, -0.75], B = [ 4]     τ_2: A = [0.25, 0.5, 0.75], B = [-4]
    # global: P = 4, ⌊2⌋ = 2, κ = 2nd smallest of {.25, .5, .75, 4} = 0.5 for both models
    #   τ̂_1: A = [0, .5, -.75], B = [4];  τ̂_2: A = [0, .5, .75], B = [-4]
    #   Σ: A = [0, 1, 0], B = [0] → γ = A [0, +, 0], B [0]; global majority sign(1) = + → all +
    #   agreeing: A {}, {.5, .5}, {.75}; B {4} → sum A [0, 1, .75] B [4]; mean A [0, .5, .75] B [4]
    #   θ = 1 + 0.5·τ_m → sum A [1, 1.5, 1.375] B [3]; mean A [1, 1.25, 1.375] B [3]
    # per_tensor (mergekit): A: max(1, int(1.5)) = 1 kept per model: τ̂_1 A = [0, 0, -.75], τ̂_2 A = [0, 0, .75]
    #   → Σ = [0, 0, 0] → γ = + everywhere (zero sums go to +) → agreeing A {}, {}, {.75} → A [1, 1, 1.375]
    #   B: max(1, int(0.5)) = 1 → both kept; Σ = 0 → γ = + → {4}: λ·4 = 2 → B = [3]
    base = {"a": torch.ones(3), "b": torch.ones(1)}
    models = [
        {"a": 1 + torch.tensor([0.25, 0.5, -0.75]), "b": 1 + torch.tensor([4.0])},
        {"a": 1 + torch.tensor([0.25, 0.5, 0.75]), "b": 1 + torch.tensor([-4.0])},
    ]
    got = drive(Ties(TiesParams(density=0.5, scope=scope, disjoint=disjoint, scale=0.5), 2), base, models)
    assert got["a"].tolist() == expected_a
    assert got["b"].tolist() == expected_b


# --------------------------------------------------------------------------------------- CART layer choice


@pytest.mark.parametrize(
    "name",
    [
        "bert.encoder.layer.3.attention.self.query.weight",
        "encoder.layer.0.attention.self.value.weight",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
        "transformer.layer.2.attention.q_lin.weight",
        "transformer.layer.2.attention.out_lin.weight",
        "transformer.layer.2.ffn.lin1.weight",
        "vision_model.encoder.layers.5.self_attn.k_proj.weight",
        "vision_model.encoder.layers.5.self_attn.out_proj.weight",
        "vision_model.encoder.layers.5.mlp.fc2.weight",
        "vit.encoder.layer.1.attention.attention.key.weight",
        "visual.transformer.resblocks.7.attn.in_proj_weight",
        "visual.transformer.resblocks.7.attn.out_proj.weight",
        "visual.transformer.resblocks.7.mlp.c_fc.weight",
        "visual.transformer.resblocks.7.mlp.c_proj.weight",
    ],
)
def test_cart_default_patterns_select_attention_and_mlp_weights(name):
    assert Cart(CartParams(), 2).is_lowrank(name, torch.Size([4, 4]))


@pytest.mark.parametrize(
    "name",
    [
        "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.0.output.dense.bias",
        "pooler.dense.weight",
        "embeddings.word_embeddings.weight",
        "transformer.layer.2.sa_layer_norm.weight",
        "vision_model.encoder.layers.5.layer_norm1.weight",
        "vision_model.encoder.layers.5.mlp.fc1.bias",
        "visual.transformer.resblocks.7.attn.in_proj_bias",
        "visual.transformer.resblocks.7.ln_1.weight",
        "visual.conv1.weight",
        "visual.proj",
    ],
)
def test_cart_default_patterns_skip_biases_norms_and_embeddings(name):
    assert not Cart(CartParams(), 2).is_lowrank(name, torch.Size([4, 4]))


def test_cart_only_lowranks_two_dimensional_tensors_and_custom_patterns():
    method = Cart(CartParams(lowrank_patterns=[r"^w$"]), 2)
    assert method.is_lowrank("w", torch.Size([3, 3]))
    assert not method.is_lowrank("w", torch.Size([3, 3, 3]))
    assert not method.is_lowrank("encoder.layer.0.intermediate.dense.weight", torch.Size([3, 3]))


# --------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("method", "params", "num_models", "message"),
    [
        ("ties", {"density": 1.5}, 3, r"density=1\.5.*'density'"),
        ("ties", {"density": -0.1}, 3, "density"),
        ("ties", {"scope": "layer"}, 3, "'scope' must be one of"),
        ("ties", {"disjoint": "max"}, 3, "'disjoint' must be one of"),
        ("ties", {"scale": [0.1, 0.2]}, 3, "'scale' has 2 values but there are 3 models"),
        ("task_arithmetic", {"scale": [0.1, 0.2, 0.3, 0.4]}, 3, "'scale' has 4 values but there are 3 models"),
        ("task_arithmetic", {"scale": "big"}, 3, "scale"),
        ("dare", {"drop_rate": 1.0}, 3, "drop_rate"),
        ("dare", {"drop_rate": -0.5}, 3, "drop_rate"),
        ("dare", {"seed": -1}, 3, "seed"),
        ("dare", {"scale": [0.3]}, 3, "'scale' has 1 values but there are 3 models"),
        ("dare", {"then": "ties", "scale": [0.3, 0.1]}, 3, "'scale' has 2 values"),
        ("dare", {"then": "magmax"}, 3, "'then' must be one of"),
        ("dare", {"density": 0.3}, 3, r"density only apply with then='ties'"),
        ("dare", {"targets": "linear"}, 3, "'targets' must be one of"),
        ("cart", {"rank_ratio": 0.0}, 3, "rank_ratio"),
        ("cart", {"rank_ratio": 1.5}, 3, "rank_ratio"),
        ("cart", {"energy": 1.5}, 3, "energy"),
        ("cart", {"energy": 0.9, "rank_ratio": 0.5}, 3, "both energy=0.9 and rank_ratio=0.5"),
        ("cart", {"lowrank_patterns": ["attn.("]}, 3, "lowrank_patterns.*invalid regex"),
        ("weight_average", {"weights": [1.0, -1.0, 1.0]}, 3, "weights.*non-negative"),
        ("weight_average", {"weights": [1.0, 1.0]}, 3, "'weights' has 2 values but there are 3 models"),
        ("weight_average", {"weights": [0.0, 0.0]}, 2, "'weights'.*sum to 0"),
        ("model_stock", {}, 1, "at least 2 fine-tuned models"),
        ("magmax", {"scale": "x"}, 2, "scale"),
    ],
)
def test_invalid_parameters_raise_config_error_naming_them(method, params, num_models, message):
    with pytest.raises(ConfigError, match=message):
        build_method(method, params, num_models)


def test_valid_parameters_build_and_dare_default_scales():
    assert build_method("cart", {"energy": 0.9}, 2).params.energy == 0.9
    assert build_method("cart", {"energy": 0.9, "rank_ratio": 0.12}, 2).params.energy == 0.9  # default ratio ok
    assert build_method("dare", {}, 2).inner.scales == [0.3, 0.3]
    ties_inner = build_method("dare", {"then": "ties", "density": 0.4, "scope": "per_tensor"}, 2).inner
    assert ties_inner.scales == [0.5, 0.5] and ties_inner.params.density == 0.4
    assert build_method("ties", {"scale": [0.1, 0.2]}, 2).scales == [0.1, 0.2]
    assert build_method("weight_average", {"weights": [3, 1]}, 2).weights == [0.75, 0.25]


def test_every_method_declares_one_line_docs_and_flags():
    specs = {spec.name: spec for spec in list_methods()}
    weight_space = {name for name, spec in specs.items() if spec.runs == "streaming"}
    assert weight_space == {"weight_average", "task_arithmetic", "ties", "dare", "magmax", "cart", "consensus", "model_stock"}
    assert all(specs[name].reads == "nothing" and not specs[name].transductive for name in weight_space)
    assert not specs["weight_average"].needs_base and not specs["cart"].needs_base
    assert specs["ties"].needs_base and specs["model_stock"].needs_base
    assert specs["consensus"].min_models == 2 and specs["model_stock"].min_models == 2
    for spec in specs.values():  # every entry of the one registry, data-dependent ones and NeuLig included
        assert spec.summary and "\n" not in spec.summary and spec.run_with
        for row in describe_params(spec.params):
            assert row["doc"] and "\n" not in row["doc"], (spec.name, row["name"])
    ties_params = {row["name"]: row for row in describe_params(specs["ties"].params)}
    assert ties_params["density"]["default"] == "0.2" and ties_params["scope"]["default"] == "'global'"
    assert re.search(r"global \| per_tensor", ties_params["scope"]["range"])
