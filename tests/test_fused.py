"""The fused TIES step: compiled by torch.compile it gives the eager step's values (bit for bit on θ₀ + merged);
compiler failures
fall back to the eager step with one warning; MERGELAB_COMPILE=0 never compiles."""

from __future__ import annotations

import pytest
import torch

from mergelab.merging import fused
from mergelab.merging.fused import FusedStep, ties_step
from mergelab.merging.methods.ties import Ties, TiesParams


def _chunk(seed: int, n: int = 5000, grid: bool = False):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator)
    deltas = [torch.randn(n, generator=generator) * 0.1 for _ in range(3)]
    if grid:  # exact ties with the bounds and exactly cancelling sums
        deltas = [torch.round(d * 20) / 20 for d in deltas]
    return base, [base + d for d in deltas]


def _args(base, models, mean: bool, majority: float):
    high = torch.tensor([0.1, 0.05, 0.15])
    low_cut = torch.tensor([0.08, 0.04, 0.1])
    return (base, models, high, low_cut, torch.tensor([0.3, 1.0, 0.7]), torch.tensor(0.5), torch.tensor(majority),
            mean)  # fmt: skip


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(("with_base", "mean"), [(True, False), (False, True)])
def test_compiled_step_equals_the_eager_step_bit_for_bit(monkeypatch, with_base, mean):
    monkeypatch.setenv("MERGELAB_COMPILE", "1")
    step = FusedStep(ties_step)
    for seed, (n, grid, majority) in enumerate([(5000, False, 1.0), (4097, True, -1.0), (3001, True, 0.0)]):
        base, models = _chunk(seed, n, grid)
        if not with_base:
            models, base = [m - base for m in models], None
        args = _args(base, models, mean, majority)
        merged, bracket, count = (step(n, *args, outputs) for outputs in ("merge", "bracket", "count"))
        eager_bracket, eager_count = ties_step(*args, "bracket"), ties_step(*args, "count")
        assert step.compiling  # really compiled, not fallen back
        # bit for bit with a base; without one (DARE's τ path) a zero may differ in sign only (+0.0 against −0.0)
        same = _bits_equal if with_base else torch.equal
        assert same(merged.result, eager_bracket.result) and same(bracket.result, eager_bracket.result)
        assert merged.open is None and merged.kept is None and merged.signs is None and bracket.signs is None
        assert count.result is None
        for got in (bracket, count):
            assert torch.equal(got.open > 0, eager_bracket.open > 0) and torch.equal(got.kept, eager_bracket.kept)
        assert float(count.signs) == float(eager_count.signs)


def test_the_outputs_of_a_step_are_those_its_definition_gives():
    """Hand-checked on four positions: bounds high = 0.5, low_cut = 0.2 on every row, λ = 1, outer 1, no base."""
    taus = [torch.tensor([0.6, 0.3, -0.9, 0.0]), torch.tensor([-0.7, 0.1, 0.8, 0.0]), torch.tensor([0.1, 0.0, -0.6, 0.0])]
    bounds, ones = torch.full((3,), 0.5), torch.ones(3)
    args = (None, taus, bounds, torch.full((3,), 0.2), ones, torch.tensor(1.0), torch.tensor(-1.0), False)
    merge, count = ties_step(*args, "merge"), ties_step(*args, "count")
    # kept: row 0 keeps 0.6, −0.9; row 1 −0.7, 0.8; row 2 −0.6. S = (−0.1, 0, −0.7, 0): γ = (−, majority −, −, −)
    assert torch.allclose(merge.result, torch.tensor([-0.7, 0.0, -1.5, 0.0]))
    assert torch.equal(count.open > 0, torch.tensor([False, True, False, False]))  # only 0.3 lies in (0.2, 0.5]
    assert count.kept.tolist() == [2.0, 2.0, 1.0]
    assert float(count.signs) == -2.0  # sign(S) over the positions not open (0, 2, 3): −1 + −1 + 0


def _merge_all(method: Ties, base: dict, models: list[dict]) -> dict:
    """Every statistics pass over every tensor, then the merge of each (as the engine drives a method)."""
    for pass_index in range(method.num_stat_passes()):
        for name in base:
            if method.pass_needed(pass_index):
                method.observe(pass_index, name, base[name], [m[name] for m in models])
        method.end_pass(pass_index)
    return {name: method.merge_tensor(name, base[name], [m[name] for m in models]) for name in base}


@pytest.mark.parametrize("params", [TiesParams(scope="per_tensor", density=0.2, scale=[0.3, 0.5, 0.4]),
                                    TiesParams(scope="global", density=0.2, scale=0.3)])  # fmt: skip
def test_compiled_ties_merge_equals_the_eager_merge(monkeypatch, params):
    generator = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(300, 300, generator=generator), "v": torch.randn(5000, generator=generator)}
    models = [{k: t + torch.randn(t.shape, generator=generator) * 0.01 for k, t in base.items()} for _ in range(3)]
    monkeypatch.setenv("MERGELAB_COMPILE", "0")
    eager = _merge_all(Ties(params, 3), base, models)
    monkeypatch.setenv("MERGELAB_COMPILE", "1")
    method = Ties(params, 3)
    compiled = _merge_all(method, base, models)
    assert method._step.compiling
    assert all(_bits_equal(compiled[name], eager[name]) for name in base)


def test_warm_up_compiles_on_a_thread_and_later_calls_reuse_it(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("MERGELAB_COMPILE", "1")
    step = FusedStep(ties_step)
    base, models = _chunk(7, n=300)
    step.warm_up((*_args(base, models, False, 1.0), "merge"))
    assert step._warming is not None and step._warming.name == "mergelab-compile"
    step._warming.join()
    graphs = counters["stats"]["unique_graphs"]
    base, models = _chunk(8, n=5000)  # another size: the same (dynamic) graph
    got = step(5000, *_args(base, models, False, 1.0), "merge")
    assert counters["stats"]["unique_graphs"] == graphs and step.compiling
    assert _bits_equal(got.result, ties_step(*_args(base, models, False, 1.0), "merge").result)


def _broken_compile(function, **kwargs):
    def fail(*args):
        raise RuntimeError("no C++ compiler found\ndetails")

    return fail


def test_a_compiler_failure_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    monkeypatch.setenv("MERGELAB_COMPILE", "1")
    monkeypatch.setattr(fused.torch, "compile", _broken_compile)
    base, models = _chunk(1)
    args = _args(base, models, False, 1.0)
    step = FusedStep(ties_step)
    with pytest.warns(RuntimeWarning, match="could not compile the fused ties_step .no C\\+\\+ compiler found.; running"):
        got = step(5000, *args)
    assert _bits_equal(got.result, ties_step(*args).result) and not step.compiling
    step(5000, *args)  # no second attempt, no second warning (pytest would fail on an unexpected error)


def test_where_trusting_the_isa_fails_the_step_compiles_with_probing_silently(monkeypatch, recwarn):
    monkeypatch.setenv("MERGELAB_COMPILE", "1")
    real_compile, seen = torch.compile, []

    def fake(function, **kwargs):
        if kwargs.get("options"):
            seen.append(kwargs["options"])
            return _broken_compile(function)
        seen.append({})
        return real_compile(function, **kwargs)

    monkeypatch.setattr(fused.torch, "compile", fake)
    base, models = _chunk(3)
    args = _args(base, models, False, 1.0)
    step = FusedStep(ties_step)
    got = step(5000, *args)
    assert seen == [fused.TRUSTED_ISA, {}] and step.compiling
    assert _bits_equal(got.result, ties_step(*args).result)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_compile_switched_off_never_compiles(monkeypatch):
    monkeypatch.setenv("MERGELAB_COMPILE", "0")
    monkeypatch.setattr(fused.torch, "compile", lambda *a, **k: pytest.fail("compiled although switched off"))
    base, models = _chunk(2)
    args = _args(base, models, True, 1.0)
    assert _bits_equal(FusedStep(ties_step)(5000, *args).result, ties_step(*args).result)
