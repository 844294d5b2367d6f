"""Data-dependent merging (mergelab.learned): hand-checked maths on tiny modules, then end to end on tiny HF BERTs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import mergelab
from mergelab.api.registry import METHOD_CLASSES, build_method, get_method_spec, list_methods
from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.data.types import TextTask
from mergelab.learned import tall_masks as tall_module
from mergelab.learned.adamerging import entropy, learn_coefficients, merged_parameters
from mergelab.learned.api import neulig_with_data, tall_masks_with_data
from mergelab.learned.base import DataMergeMethod
from mergelab.learned.experts import load_expert_set
from mergelab.learned.fisher import batch_squared_fisher, diagonal_fisher, fisher_merge
from mergelab.learned.neulig import (
    NeuLigOptions,
    batch_weights,
    merge_vs_ensemble,
    regulariser,
    standardized_xi,
    train_router,
)
from mergelab.learned.regmean import linear_input_grams, regmean_merge, regmean_solve, shrink
from mergelab.learned.tall_masks import (
    apply_mask,
    compute_tall_masks,
    model_consensus_mask,
    model_tall_mask,
    multitask_vector,
)
from mergelab.merging.base import MergeMethod
from mergelab.merging.ops import ties_multitask_vector, ties_selected_vectors
from mergelab.models.hf import load_encoder
from tests._learned_helpers import tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, TextTask]]:
    return tiny_family(tmp_path_factory.mktemp("learned"), num_tasks=2, train_steps=25)


def _encoder_state(path: Path) -> dict[str, torch.Tensor]:
    return load_encoder(path, path).model.state_dict()


def _merge(method: str, base: Path, finetuned: dict, tasks: dict, **options) -> dict[str, torch.Tensor]:
    """``mergelab.merge`` of a data-dependent method, in memory: the merged state dict."""
    return mergelab.merge(method, base, finetuned, data=tasks, **options).state


def _close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), atol=atol, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------- RegMean


def test_regmean_on_one_linear_layer_is_the_least_squares_solution():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 3), nn.Linear(5, 3)]
    inputs = [torch.randn(40, 5), 2 * torch.randn(25, 5) + 1]  # different counts: G_t = X_tᵀX_t / n_t
    grams = [linear_input_grams(layer, [{"input": x}]) for layer, x in zip(layers, inputs, strict=True)]
    torch.testing.assert_close(grams[1]["weight"], inputs[1].T @ inputs[1] / 25)
    states = [layer.state_dict() for layer in layers]
    merged = regmean_merge(states[0], states, grams, alpha=1.0)
    # min_W Σ_t (1/n_t) ‖X_t Wᵀ − X_t W_tᵀ‖²: ordinary least squares on rows scaled by 1/√n_t
    rows = torch.cat([x.double() / math.sqrt(len(x)) for x in inputs])
    targets = torch.cat([(x @ s["weight"].T).double() / math.sqrt(len(x)) for x, s in zip(inputs, states, strict=True)])
    expected = torch.linalg.lstsq(rows, targets).solution.T
    torch.testing.assert_close(merged["weight"].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["bias"], (states[0]["bias"] + states[1]["bias"]) / 2)  # non-Linear-weight: mean
    # shrinkage: off-diagonals × α, then the same closed form, computed here by hand
    alpha = 0.5
    shrunk = [
        g["weight"].double() * alpha + torch.diag(torch.diagonal(g["weight"].double())) * (1 - alpha) for g in grams
    ]
    by_hand = torch.linalg.solve(
        sum(shrunk), sum(g @ s["weight"].double().T for g, s in zip(shrunk, states, strict=True))
    ).T
    torch.testing.assert_close(
        regmean_merge(states[0], states, grams, alpha)["weight"].double(), by_hand, atol=1e-5, rtol=1e-5
    )


def test_regmean_of_one_model_returns_it_even_when_singular():
    torch.manual_seed(1)
    weight = torch.randn(3, 4)
    few = torch.randn(2, 4)  # 2 rows < 4 inputs: the Gram is singular, the ridge fallback pulls towards W
    for x in (torch.randn(30, 4), few):
        for alpha in (1.0, 0.5):
            torch.testing.assert_close(regmean_solve([x.T @ x / len(x)], [weight], alpha), weight, atol=1e-5, rtol=1e-5)
    assert torch.equal(shrink(torch.tensor([[2.0, 1.0], [1.0, 3.0]]), 0.0), torch.diag(torch.tensor([2.0, 3.0])))
    # two models on a singular system: finite, and the normal equations hold up to the tiny ridge
    weights = [weight, torch.randn(3, 4)]
    grams = [few.T @ few, few.T @ few]
    merged = regmean_solve(grams, weights, 1.0).double()
    lhs = sum(g.double() for g in grams)
    rhs = sum(g.double() @ w.double().T for g, w in zip(grams, weights, strict=True))
    assert torch.isfinite(merged).all()
    assert float((lhs @ merged.T - rhs).norm() / rhs.norm()) < 1e-4


def test_regmean_grams_count_only_unmasked_tokens():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kept = x[mask.bool()]
    grams = linear_input_grams(Wrapper(), [{"x": x, "attention_mask": mask}])
    torch.testing.assert_close(grams["proj.weight"], kept.T @ kept / 4)


def test_regmean_end_to_end_one_model_and_written_checkpoint(family, tmp_path):
    from transformers import AutoModel

    base, finetuned, tasks = family
    single = _merge("regmean", base, {"task0": finetuned["task0"]}, {"task0": tasks["task0"]})
    _close_states(single, _encoder_state(finetuned["task0"]), atol=1e-4)  # RegMean of one model is that model
    result = mergelab.merge("regmean", base, finetuned, data=tasks, out=tmp_path / "merged", num_examples=8)
    out = result.path
    assert out == tmp_path / "merged" and result.state is None and result.info["solved_linear_weights"] == 7
    assert result.record()["split"] == "train" and result.record()["transductive"] is False
    loaded = AutoModel.from_pretrained(out).state_dict()
    state = _merge("regmean", base, finetuned, tasks, num_examples=8)
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor)
    assert load_encoder(state, base).encode_texts(["apple pear", "oak"]).shape == (2, 16)
    with pytest.raises(CheckpointError, match="exists"):
        mergelab.merge("regmean", base, finetuned, data=tasks, out=tmp_path / "merged")  # no silent overwrite


# -------------------------------------------------------------------------------------------------- Fisher


class _Linear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_exact_fisher_and_batch_squared_variant_by_hand():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    xs = torch.randn(2, 4)
    model = _Linear(w)
    probs = torch.softmax(xs @ w.T, -1)
    eye = torch.eye(3)
    # exact: ∇_W log p_c(x) = (e_c − p) xᵀ, so F = mean_x Σ_c p_c ((e_c − p) xᵀ)²
    exact = sum(probs[i, c] * torch.outer(eye[c] - probs[i], xs[i]) ** 2 for i in range(2) for c in range(3)) / 2
    got = diagonal_fisher(model, [{"x": xs[i : i + 1]} for i in range(2)], {"weight": model.weight})["weight"]
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-5)
    # FusionBench: s = Σ_i Σ_c √p_ic log p_ic (√p detached); ∂s/∂z_i = √p_i − (Σ_c √p_ic) p_i; F = (∇_W s)² / N
    dz = probs.sqrt() - probs.sqrt().sum(1, keepdim=True) * probs
    batch = (dz.T @ xs) ** 2 / 2
    got_batch = batch_squared_fisher(model, [{"x": xs}], {"weight": model.weight})["weight"]
    torch.testing.assert_close(got_batch, batch, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, got_batch, atol=1e-3)  # the two estimators are different quantities
    with pytest.raises(DataError, match="one example per forward pass"):
        diagonal_fisher(model, [{"x": xs}], {"weight": model.weight})
    sampled = [diagonal_fisher(model, [{"x": xs[:1]}] * 4, {"weight": model.weight}, "sampled", seed=3) for _ in "ab"]
    assert torch.equal(sampled[0]["weight"], sampled[1]["weight"])  # seeded


def test_equal_fishers_give_the_weight_average_and_uncovered_stay_at_base():
    torch.manual_seed(2)
    base = {"w": torch.randn(2, 3), "u": torch.randn(4), "ids": torch.arange(2)}
    states = [
        {k: (v + torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v) for k, v in base.items()}
        for _ in range(3)
    ]
    for normalize in (False, True):
        fishers = [{"w": torch.full((2, 3), 0.7)} for _ in range(3)]
        merged = fisher_merge(states, fishers, base, normalize=normalize)
        torch.testing.assert_close(merged["w"], torch.stack([s["w"] for s in states]).mean(0))
        assert torch.equal(merged["u"], base["u"]) and torch.equal(merged["ids"], base["ids"])  # no Fisher: θ₀
    fishers = [{"w": torch.full((2, 3), 1e-2)}, {"w": torch.full((2, 3), 1e6)}, {"w": torch.full((2, 3), 1e-2)}]
    torch.testing.assert_close(fisher_merge(states, fishers, base)["w"], states[1]["w"], atol=1e-4, rtol=1e-4)


def test_fisher_end_to_end_one_model_is_that_model(family):
    base, finetuned, tasks = family
    for method, params in (
        ("fisher", {"num_examples": 4}),
        ("fisher_batch", {"num_examples": 4, "fisher_batch_size": 2}),
    ):
        single = _merge(method, base, {"task1": finetuned["task1"]}, {"task1": tasks["task1"]}, **params)
        _close_states(single, _encoder_state(finetuned["task1"]))
    result = mergelab.merge("fisher", base, finetuned, data=tasks, num_examples=4, label_mode="sampled")
    state, info = result.state, result.info
    assert len(info["coefficients"]) == 2 and abs(sum(info["coefficients"]) - 1) < 1e-9
    assert load_encoder(state, base).encode_texts(["fig lime"]).shape == (1, 16)


# ---------------------------------------------------------------------------------------------- AdaMerging


def _toy_adamerging(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.7 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    heads = [nn.Linear(8, 3), nn.Linear(8, 3)]
    batches = [[{"input": torch.randn(16, 4)}], [{"input": torch.randn(16, 4)}]]
    return model, base, taus, heads, batches


def _total_entropy(model, params, heads, batches) -> float:
    from torch.func import functional_call

    with torch.no_grad():
        return sum(
            float(entropy(h(functional_call(model, params, args=(), kwargs=b[0]))))
            for h, b in zip(heads, batches, strict=True)
        )


def test_adamerging_lowers_the_entropy_on_a_toy_problem():
    model, base, taus, heads, batches = _toy_adamerging()
    names = list(base)

    def identity(output: torch.Tensor, batch: object) -> torch.Tensor:
        return output

    start = torch.full((2, 2), 0.3)
    before = _total_entropy(model, merged_parameters(base, taus, start, names, False), heads, batches)
    lam, losses = learn_coefficients(
        model, identity, base, taus, heads, batches, "layer", steps=40, lr=5e-2, clamp=False
    )
    after = _total_entropy(model, merged_parameters(base, taus, lam, names, False), heads, batches)
    assert lam.shape == (2, 2) and abs(losses[0] - before) < 1e-5
    assert after < before - 0.05
    assert all(p.grad is None for h in heads for p in h.parameters())  # heads untouched


def test_adamerging_clamp_and_task_granularity():
    model, base, taus, heads, batches = _toy_adamerging(1)
    names = list(base)
    # init 1.5 clamped to 1: θ₀ + Σ τ; unclamped: θ₀ + 1.5 Σ τ
    for clamp, scale in ((True, 1.0), (False, 1.5)):
        params = merged_parameters(base, taus, torch.full((2, 1), 1.5), names, clamp)
        for name in names:
            torch.testing.assert_close(params[name], base[name] + scale * (taus[0][name] + taus[1][name]))
    lam, _ = learn_coefficients(model, lambda o, _batch: o, base, taus, heads, batches, "task", steps=3, lr=1e-2)
    assert lam.shape == (2, 1)


def test_ties_selected_vectors_trim_globally_and_resolve_zero_signs_by_majority():
    taus = [
        {"a": torch.tensor([4.0, 0.1]), "b": torch.tensor([0.2, -1.0])},
        {"a": torch.tensor([-1.0, 0.3]), "b": torch.tensor([0.05, 2.0])},
    ]
    # P = 4, keep 50%: κ_t = 2nd smallest |τ_t| over BOTH tensors: κ_1 = 0.2, κ_2 = 0.3 (per tensor would keep 0.1)
    # trimmed: τ̂_1 = a[4, 0] b[0.2, −1], τ̂_2 = a[−1, 0.3] b[0, 2]; Σ = a[3, 0.3] b[0.2, 1] → all signs +
    selected = ties_selected_vectors(taus, density=0.5)
    assert selected[0]["a"].tolist() == [4.0, 0.0] and selected[0]["b"].tolist() == [pytest.approx(0.2), 0.0]
    assert selected[1]["a"].tolist() == [0.0, pytest.approx(0.3)] and selected[1]["b"].tolist() == [0.0, 2.0]
    mtl = ties_multitask_vector(taus, density=0.5)
    torch.testing.assert_close(mtl["b"], torch.tensor([0.2, 2.0]))
    # keep everything; Σ = [0, 0, 2.5] → γ = [0, 0, +]; zero signs take the majority (+)
    tied = ties_selected_vectors([{"w": torch.tensor([1.0, -1.0, 2.0])}, {"w": torch.tensor([-1.0, 1.0, 0.5])}], 1.0)
    assert tied[0]["w"].tolist() == [1.0, 0.0, 2.0] and tied[1]["w"].tolist() == [0.0, 1.0, 0.5]


def test_adamerging_end_to_end_reads_test_inputs_and_zero_steps_is_task_arithmetic(family):
    base, finetuned, tasks = family
    result = mergelab.merge("adamerging", base, finetuned, data=tasks, steps=3, batch_size=4)
    info = result.info
    assert result.reads == "test" and result.transductive and len(info["losses"]) == 3
    assert result.record()["split"] == "test" and result.record()["transductive"] is True
    assert all(0.0 <= c <= 1.0 for row in info["coefficients"] for c in row)
    at_init = _merge("adamerging", base, finetuned, tasks, steps=0, granularity="task", init=0.3)
    expected = mergelab.merge("task_arithmetic", base, list(finetuned.values()), scale=0.3).state
    _close_states(at_init, {k: expected[k] for k in at_init})


def test_adamerging_plus_at_its_init_is_ties_global_dis_sum(family):
    """AdaMerging++ learns one coefficient per task on the TIES-selected vectors: before any step it is exactly TIES
    (global top-k, majority sign, dis-sum) scaled by the init, over the same tensors."""
    base, finetuned, tasks = family
    for density, init in ((0.2, 0.3), (0.5, 0.8)):
        plus = _merge("adamerging", base, finetuned, tasks, steps=0, granularity="task", init=init, plus=True,
                      density=density)  # fmt: skip
        ties = mergelab.merge("ties", base, list(finetuned.values()), density=density, scope="global",
                              disjoint="sum", scale=init).state  # fmt: skip
        plain = _merge("adamerging", base, finetuned, tasks, steps=0, granularity="task", init=init)
        _close_states(plus, {k: ties[k] for k in plus}, atol=1e-6)
        assert any(not torch.allclose(plus[k], plain[k]) for k in plus if plus[k].is_floating_point())
    trained = mergelab.merge("adamerging", base, finetuned, data=tasks, steps=2, plus=True, batch_size=4)
    assert len(trained.info["losses"]) == 2 and all(torch.isfinite(t).all() for t in trained.state.values()
                                                    if t.is_floating_point())  # fmt: skip


# ----------------------------------------------------------------------------------------- TALL / consensus


def test_tall_masks_and_consensus_by_hand():
    taus = [
        {"w": torch.tensor([1.0, 0.1, -2.0])},
        {"w": torch.tensor([1.0, 0.0, 2.0])},
        {"w": torch.tensor([0.0, 0.1, 0.1])},
    ]
    mtl = multitask_vector(taus)  # Σ τ = [2, 0.2, 0.1]; τ_MTL − τ_t: [1, .1, 2.1], [1, .2, −1.9], [2, .1, 0]
    torch.testing.assert_close(mtl["w"], torch.tensor([2.0, 0.2, 0.1]))
    masks = [model_tall_mask(t, mtl, 0.6) for t in taus]
    assert masks[0]["w"].tolist() == [True, True, True]  # 1 > .6, .1 > .06, 2 > 1.26
    assert masks[1]["w"].tolist() == [True, False, True]  # 1 > .6, 0 ≯ .12, 2 > 1.14
    assert masks[2]["w"].tolist() == [False, True, True]  # 0 ≯ 1.2, .1 > .06, .1 > 0
    assert model_tall_mask(taus[1], mtl, 1.0)["w"].tolist() == [False, False, True]  # strict: 1 ≯ 1·1
    assert model_consensus_mask(masks, 2)["w"].tolist() == [True, True, True]  # votes [2, 2, 3]
    assert model_consensus_mask(masks, 3)["w"].tolist() == [False, False, True]
    base = {"w": torch.zeros(3), "ids": torch.arange(3)}
    merged = apply_mask(base, model_consensus_mask(masks, 3), mtl, scale=0.5)
    assert merged["w"].tolist() == [0.0, 0.0, pytest.approx(0.05)] and torch.equal(merged["ids"], base["ids"])


def test_tall_lambda_is_chosen_per_task_on_validation(family, monkeypatch):
    base, finetuned, tasks = family
    experts = load_expert_set(base, finetuned, tasks, "validation", with_labels=True)
    real = tall_module.validation_accuracy
    scores = iter([0.5, 0.7, 0.7, 0.1, 0.2] + [0.9, 0.1, 0.2, 0.3, 0.95])  # task0 → 0.3 (first max), task1 → 0.6
    seen = []

    def fake(encoder, state, head, texts, labels, max_length, batch_size):
        seen.append(real(encoder, state, head, texts, labels, max_length, batch_size))
        return next(scores)

    monkeypatch.setattr(tall_module, "validation_accuracy", fake)
    result = compute_tall_masks(experts)
    assert result.lambdas == {"task0": 0.3, "task1": 0.6} and all(0.0 <= a <= 1.0 for a in seen)
    for task, lam in result.lambdas.items():
        tau = {n: experts.expert_states()[int(task[-1])][n] - result.base[n] for n in result.tau_mtl}
        expected = model_tall_mask(tau, result.tau_mtl, lam)
        assert all(torch.equal(expected[n], result.masks[task][n]) for n in expected)
    rebuilt = result.reconstruct("task1")
    name = "encoder.layer.0.output.dense.weight"
    mask = result.masks["task1"][name]
    torch.testing.assert_close(
        rebuilt[name], result.base[name] + torch.where(mask, result.tau_mtl[name], torch.zeros(()))
    )


def test_validation_accuracy_of_an_expert_is_its_accuracy(family):
    base, finetuned, tasks = family
    experts = load_expert_set(base, finetuned, tasks, "validation", with_labels=True)
    expert = experts.experts[0]
    features = expert.model.encoder.encode_texts(expert.texts)
    expected = float((expert.model.head(features).argmax(1) == torch.tensor(expert.labels)).float().mean())
    got = tall_module.validation_accuracy(
        experts.base_encoder(),
        expert.model.encoder.model.state_dict(),
        expert.model.head,
        expert.texts,
        expert.labels,
        64,
        8,
    )
    assert got == pytest.approx(expected)


def test_tall_consensus_end_to_end(family):
    base, finetuned, tasks = family
    base_state = _encoder_state(base)
    _close_states(_merge("tall_consensus", base, finetuned, tasks, scale=0.0), base_state, atol=0.0)
    everything = _merge("tall_consensus", base, finetuned, tasks, min_tasks=0, scale=1.0)
    expected = mergelab.merge("task_arithmetic", base, list(finetuned.values()), scale=1.0).state
    _close_states(everything, {k: expected[k] for k in everything})  # k = 0 keeps every weight: θ₀ + Σ τ
    info = mergelab.merge("tall_consensus", base, finetuned, data=tasks, base_merge="ties").info
    assert set(info["lambdas"]) == {"task0", "task1"} and 0.0 < info["kept_fraction"] < 1.0
    per_task = tall_masks_with_data(base, finetuned, tasks, {"lambdas": (0.4,)})
    assert set(per_task) == {"task0", "task1"} and all(set(s) == set(base_state) for s in per_task.values())
    no_val = {
        t: TextTask(t, {k: v for k, v in task.splits.items() if k != "validation"}, task.label_names)
        for t, task in tasks.items()
    }
    with pytest.raises(DataError, match="no validation split"):
        _merge("tall_consensus", base, finetuned, no_val)
    with pytest.raises(ConfigError, match="at least 2"):
        _merge("tall_consensus", base, {"task0": finetuned["task0"]}, tasks)
    with pytest.raises(ConfigError, match=r"base_merge='mean'.*'base_merge' must be one of task_arithmetic \| ties"):
        tall_masks_with_data(base, finetuned, tasks, {"base_merge": "mean"})


def test_tall_consensus_memo_reuses_the_masks_across_scales(family, count_calls):
    from mergelab.learned import tall_masks as tall_module

    base, finetuned, tasks = family
    calls = count_calls(tall_module, "compute_tall_masks")
    memo: dict = {}
    first = _merge("tall_consensus", base, finetuned, tasks, scale=0.5, memo=memo)
    second = _merge("tall_consensus", base, finetuned, tasks, scale=1.0, memo=memo)
    assert len(calls) == 1  # the masks depend on the models, data and λ grid, not on α
    fresh = _merge("tall_consensus", base, finetuned, tasks, scale=1.0)
    _close_states(second, fresh, atol=0.0)
    base_state = _encoder_state(base)
    for name in first:  # θ₀ + α·M⊙τ: the α = 0.5 update is half the α = 1 update
        if first[name].is_floating_point():
            torch.testing.assert_close(first[name] - base_state[name], 0.5 * (second[name] - base_state[name]))
    assert len(calls) == 2  # without a memo the masks are computed again
    _merge("tall_consensus", base, finetuned, tasks, lambdas=(0.3,), memo=memo)
    assert len(calls) == 3  # a different λ grid is another entry


# ------------------------------------------------------------------------------------------------- NeuLig


def _toy_neulig():
    torch.manual_seed(0)
    d, n = 4, 200
    maps = [torch.eye(d), torch.linalg.qr(torch.randn(d, d))[0]]  # expert k's encoder: x ↦ A_k x
    heads = [nn.Linear(d, 3), nn.Linear(d, 3)]
    shift = torch.tensor([3.0, 0.0, 0.0, 0.0])
    inputs = [torch.randn(n, d) + shift, torch.randn(n, d) - shift]
    with torch.no_grad():  # labels are expert t's own predictions on task t: expert t is right on task t
        labels = [heads[t](inputs[t] @ maps[t].T).argmax(1) for t in range(2)]
    features = [[inputs[t] @ maps[k].T for k in range(2)] for t in range(2)]
    return maps, heads, inputs, labels, features, [{"A": maps[0]}, {"A": maps[1]}]


def test_neulig_router_learns_to_pick_the_right_expert():
    _, heads, _, labels, features, states = _toy_neulig()
    router = train_router(features, labels, heads, standardized_xi(states), loss="ce", steps=300, lr=1e-2)
    for task in range(2):
        assert batch_weights(router, features[task], "mean")[task] > 0.8


def test_neulig_merging_equals_ensembling_for_linear_encoders_on_single_items():
    maps, heads, inputs, labels, features, states = _toy_neulig()
    router = train_router(features, labels, heads, standardized_xi(states), loss="entropy", steps=30, lr=1e-2)
    items = [([f[i : i + 1] for f in features[0]], inputs[0][i : i + 1], labels[0][i : i + 1]) for i in range(40)]
    result = merge_vs_ensemble(router, items, states, lambda s, x: x @ s["A"].T, heads[0], "first")
    assert result["gap"] == 0.0 and result["merge"] == result["ensemble"]
    pair = [f[:2] for f in features[0]]
    with torch.no_grad():
        both = router(pair)
    torch.testing.assert_close(batch_weights(router, pair, "first"), both[0])
    torch.testing.assert_close(batch_weights(router, pair, "mean"), both.mean(0))


def test_neulig_regulariser_and_xi_by_hand():
    xi = standardized_xi([{"w": torch.ones(3), "i": torch.arange(2)}, {"w": 3 * torch.ones(3), "i": torch.arange(2)}])
    # θ̄ = 2: ξ = [−3, 3] → standardised (unbiased std) [−1/√2, 1/√2]
    torch.testing.assert_close(xi, torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    # w·ξ with ξ = [1, −1]: [−0.5, 1] → mean square 0.625 → / 100
    assert float(regulariser(weights, torch.tensor([1.0, -1.0]))) == pytest.approx(0.00625)


def test_neulig_end_to_end_reports_ensemble_merge_and_gap(family):
    _, finetuned, tasks = family
    options = NeuLigOptions(steps=20, lr=1e-2, batch_size=8, eval_batch_size=4, test_examples=12)
    report = neulig_with_data(finetuned, tasks, options)
    assert set(report.variants) == {"first", "mean"} and report.results is report.variants["first"]
    for table in report.variants.values():
        assert set(table) == {"task0", "task1"}
        for row in table.values():
            assert 0.0 <= row["merge"] <= 1.0 and row["gap"] == pytest.approx(row["ensemble"] - row["merge"])
            assert 0.5 <= row["top_weight"] <= 1.0 and sum(row["mean_weights"]) == pytest.approx(1.0, abs=1e-5)
    # the ensemble side does not depend on the rule that picks the merge weights
    assert report.variants["first"]["task0"]["ensemble"] == report.variants["mean"]["task0"]["ensemble"]
    assert set(report.average_of("mean")) == {"ensemble", "merge", "gap", "top_weight"}
    with pytest.raises(ConfigError, match=r"method 'neulig': weights_from='last'.*'first' or 'mean'"):
        neulig_with_data(finetuned, tasks, {"steps": 1, "weights_from": "last"})
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'step' for method 'neulig'"):
        neulig_with_data(finetuned, tasks, {"step": 1})
    # cached test features give the same report as the experts' own forward passes
    from mergelab.learned.neulig import expert_features

    encoders = [load_encoder(p, p) for p in finetuned.values()]
    cached = {t: expert_features(encoders, task.splits["test"].texts) for t, task in tasks.items()}
    same = neulig_with_data(finetuned, tasks, options, test_features=cached)
    for rule in ("first", "mean"):
        for task in tasks:
            assert same.variants[rule][task]["merge"] == report.variants[rule][task]["merge"]
            assert same.variants[rule][task]["ensemble"] == pytest.approx(report.variants[rule][task]["ensemble"])
    with pytest.raises(DataError, match="one \\["):
        neulig_with_data(finetuned, tasks, {"steps": 1}, test_features={t: v[:1] for t, v in cached.items()})


# ----------------------------------------------------------------------------------------------- registry / api


def test_one_registry_lists_every_method_with_what_it_reads_and_how_it_runs():
    specs = {spec.name: spec for spec in list_methods()}
    assert list(specs) == ["weight_average", "task_arithmetic", "ties", "dare", "magmax", "cart", "consensus",
                           "model_stock", "fisher", "fisher_batch", "regmean", "adamerging", "tall_consensus",
                           "tall_masks", "neulig", "pleas"]  # fmt: skip
    assert [n for n, s in specs.items() if s.reads_data and s.produces == "merged_model"] == [
        "fisher", "fisher_batch", "regmean", "adamerging", "tall_consensus"]  # fmt: skip
    assert [n for n, s in specs.items() if s.transductive] == ["adamerging"]
    assert specs["tall_consensus"].reads == "validation" and specs["tall_consensus"].needs_labels
    assert specs["regmean"].reads == "train" and not specs["regmean"].needs_labels
    assert {n: s.produces for n, s in specs.items() if s.produces != "merged_model"} == {
        "tall_masks": "per_task_models", "neulig": "router", "pleas": "wider_model"}  # fmt: skip
    for cls in METHOD_CLASSES:  # the route a spec declares is the one its class family runs
        streaming = issubclass(cls, MergeMethod)
        assert streaming != issubclass(cls, DataMergeMethod)
        assert cls.spec.runs == ("streaming" if streaming else "in_memory") and cls.spec.reads_data != streaming
    neulig = get_method_spec("neulig").params()
    assert (neulig.steps, neulig.train_examples, neulig.weights_from) == (300, 512, ["first", "mean"])


def test_one_validation_for_the_parameters_of_every_method():
    with pytest.raises(ConfigError, match=r"unknown merge method 'regmeen'; choose one of: .*regmean"):
        build_method("regmeen", {}, 2)
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'alhpa' for method 'regmean'.*alpha, num_examples"):
        build_method("regmean", {"alhpa": 0.5}, 2)
    with pytest.raises(ConfigError, match=r"alpha=1.5.*'alpha' must be >=0.0 and <=1.0"):
        build_method("regmean", {"alpha": 1.5}, 2)
    with pytest.raises(ConfigError, match=r"label_mode='exact'.*'label_mode' must be one of expected \| sampled"):
        build_method("fisher", {"label_mode": "exact"}, 2)
    with pytest.raises(ConfigError, match=r"invalid parameter for method 'ties': scope='layer'.*must be one of global"):
        build_method("ties", {"scope": "layer"}, 2)  # the same style for a weight-space method
    with pytest.raises(ConfigError, match=r"method 'tall_consensus' needs at least 2 fine-tuned models, got 1"):
        build_method("tall_consensus", {}, 1)
    with pytest.raises(ConfigError, match=r"invalid parameter for method 'neulig': steps=0.*'steps' must be >=1"):
        get_method_spec("neulig").validate({"steps": 0})
    assert build_method("adamerging", {"batch_size": 4}, 2).params.batch_size == 4


def test_merge_checks_tasks_and_labels(family):
    base, finetuned, tasks = family
    with pytest.raises(DataError, match=r"models and data must name the same tasks; without data: \['task1'\]"):
        _merge("regmean", base, finetuned, {"task0": tasks["task0"]})
    task = tasks["task0"]
    renamed = TextTask("task0", task.splits, ["x", "y"])  # the head says c0, c1
    with pytest.raises(DataError, match="differ from the data's labels"):
        _merge("regmean", base, {"task0": finetuned["task0"]}, {"task0": renamed})
    with pytest.raises(CheckpointError, match="is not a Hugging Face model folder \\(no config.json\\)"):
        _merge("regmean", base.parent / "missing", finetuned, tasks)
