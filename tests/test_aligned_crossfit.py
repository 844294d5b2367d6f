"""Aligned Eval: cross-fitting (default), the in-sample option, the shuffled-pairs noise control, the fast solvers.

Synthetic tasks: fine-tuned features are C well-separated class clusters and the head reads the class directions,
so the fine-tuned accuracy is ~100 %; the "merged" features are either pure noise (no class information: any
accuracy above chance is the fitted map's capacity) or an exact rotation R of the fine-tuned ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.evaluation.api import expand_cells
from mergelab.evaluation.protocols import aligned as aligned_mod
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.evaluation.types import SplitFeatures, TaskFeatures

FAMILIES = aligned_mod.TRANSFORMS


pytestmark = pytest.mark.usefixtures("one_thread")


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def task(n: int, d: int, classes: int, seed: int, merged: str) -> ProtocolContext:
    """A task of n balanced test items; ``merged`` is "noise" (independent of everything), "rotated" (R·f_t) or
    "same" (f_t itself)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, classes, generator=g))
    labels = torch.arange(n) % classes
    finetuned = 10.0 * basis.T[labels] + torch.randn(n, d, generator=g)
    if merged == "noise":
        features = 10.0 * torch.randn(n, d, generator=g)
    elif merged == "same":
        features = finetuned.clone()
    else:
        features = finetuned @ random_orthogonal(d, g).T
    head = nn.Linear(d, classes)
    with torch.no_grad():
        head.weight.copy_(basis.T)
        head.bias.zero_()
    return ProtocolContext(
        "toy",
        TaskFeatures("toy", {"test": SplitFeatures(features, labels)}),
        head,
        TaskFeatures("toy", {"test": SplitFeatures(finetuned, labels)}),
    )


def finetuned_accuracy(ctx: ProtocolContext) -> float:
    return run_protocol("current", ProtocolContext("toy", ctx.finetuned, ctx.head, ctx.finetuned)).accuracy


# --- (a) pure noise: the in-sample artefact, and cross-fitting removes it -----------------------------------


@pytest.fixture(scope="module")
def noise() -> ProtocolContext:
    return task(n=360, d=256, classes=4, seed=0, merged="noise")  # N/d ≈ 1.4


def test_noise_cross_fitted_is_chance_while_in_sample_affine_is_near_perfect(noise: ProtocolContext):
    assert finetuned_accuracy(noise) == 1.0
    for family in ("affine", "linear", "orthogonal", "procrustes"):
        out = run_protocol("aligned", noise, transform=family)
        assert out.extras["fit"] == "cross" and out.extras["control"] == "none" and out.transductive
        chance = out.extras["chance_majority"]
        assert chance == pytest.approx(0.25) and out.extras["chance_uniform"] == pytest.approx(0.25)
        # held-out: no class information reaches the head (binomial std at N = 360 is 2.3 points)
        assert abs(out.accuracy - chance) <= 0.075, (family, out.accuracy)
    in_sample = run_protocol("aligned", noise, transform="affine", fit="in_sample")
    assert in_sample.extras["fit"] == "in_sample"  # labelled as such
    assert in_sample.accuracy >= 0.85  # the artefact: an affine map memorises noise → labels in-sample
    # the in-sample control (shuffled pairs, scored on the pairs it was fitted on) memorises just as well
    control = run_protocol("aligned", noise, transform="affine", fit="in_sample", control="shuffled")
    assert control.accuracy >= 0.85 and control.extras["control"] == "shuffled"
    assert aligned_mod.cell_name("affine", "in_sample") == "aligned-insample:affine"


# --- (b) an exact rotation: recovered held-out, and every noise control sits at chance ------------------------


@pytest.fixture(scope="module")
def rotated() -> ProtocolContext:
    # 20 classes, as the demo's largest task. The control's spread is class-level: a map without pairing
    # information still sends whole clusters to one class, so with C tight clusters its accuracy varies by about
    # √((1 − 1/C)/C)/√2 (3.4 points at C = 20, 15 at C = 4) around chance from one permutation to the next.
    return task(n=2000, d=32, classes=20, seed=1, merged="rotated")


@pytest.mark.parametrize("family", ["orthogonal", "procrustes", "euclidean"])
def test_rotation_is_recovered_cross_fitted(rotated: ProtocolContext, family: str):
    upper = finetuned_accuracy(rotated)
    out = run_protocol("aligned", rotated, transform=family)
    assert out.accuracy >= upper - 0.01
    assert out.extras["l1_after"] < 0.05 * out.extras["l1_before"]  # held-out L1
    assert out.extras["orth_dev_max"] < 1e-4 and len(out.extras["fits"]) == 2
    assert len(out.extras["fit_losses"]) == 2 and all(math.isfinite(v) for v in out.extras["fit_losses"])


def test_every_familys_noise_control_is_within_5_points_of_chance(rotated: ProtocolContext):
    upper = finetuned_accuracy(rotated)
    for family in FAMILIES:
        out = run_protocol("aligned", rotated, transform=family, control="shuffled")
        chance = out.extras["chance_independent"]
        assert out.extras["control"] == "shuffled" and out.extras["fit"] == "cross"
        assert abs(out.accuracy - chance) <= 0.05, (family, out.accuracy, chance)
        assert chance <= out.extras["chance_majority"] + 1e-12
        assert out.extras["control_gap"] == pytest.approx(out.accuracy - chance)
        assert out.accuracy < upper - 0.5  # far below what the real pairing gives
        assert out.extras["chance_uniform"] == pytest.approx(0.05)


def test_the_control_is_chance_even_when_the_merged_features_alone_classify():
    # merged = fine-tuned: a near-identity map (scaling) applied to an item's own merged features would classify it;
    # the control pairs every item with another item's merged features, for fitting and scoring alike
    same = task(n=600, d=32, classes=4, seed=3, merged="same")
    for family in ("scaling", "affine", "procrustes"):
        real = run_protocol("aligned", same, transform=family)
        control = run_protocol("aligned", same, transform=family, control="shuffled")
        assert real.accuracy > 0.95, family
        assert abs(control.accuracy - control.extras["chance_independent"]) <= 0.05, (family, control.accuracy)


# --- (c) every item scored exactly once, by the map that did not see it ---------------------------------------


def test_halves_are_disjoint_cover_and_are_seeded():
    a0, b0 = aligned_mod.halves(201, seed=0)
    assert (len(a0), len(b0)) == (100, 101)
    assert set(a0.tolist()).isdisjoint(b0.tolist()) and set(a0.tolist()) | set(b0.tolist()) == set(range(201))
    a0_again, _ = aligned_mod.halves(201, seed=0)
    a1, _ = aligned_mod.halves(201, seed=1)
    assert torch.equal(a0, a0_again) and not torch.equal(a0, a1)
    with pytest.raises(DataError, match="at least 2 eval items"):
        aligned_mod.halves(1, seed=0)


@pytest.mark.parametrize("control", ["none", "shuffled"])
def test_each_half_is_scored_by_the_map_fitted_on_the_other(noise: ProtocolContext, control: str):
    out = run_protocol("aligned", noise, seed=3, transform="procrustes", control=control)
    x, y = noise.evaluated.split("test").features, noise.finetuned.split("test").features
    labels = noise.evaluated.split("test").labels
    assert len(out.predictions) == len(labels) == out.extras["n_scored"]
    assert out.accuracy == int((out.predictions == labels).sum()) / len(labels)  # correct / N, exactly
    if control == "shuffled":  # item i gets another item's merged row, for fitting and scoring alike
        x = x[aligned_mod.shuffled_rows(len(labels), 3, "aligned-control")]
    parts = aligned_mod.halves(len(labels), seed=3)
    for fit_on, score_on in ((parts[0], parts[1]), (parts[1], parts[0])):
        fitted, _ = aligned_mod.fit_transform(x[fit_on], y[fit_on], "procrustes")
        expected = noise.head(fitted(x[score_on])).argmax(dim=1)
        assert torch.equal(out.predictions[score_on], expected)
    predicted = torch.bincount(out.predictions, minlength=4).double()
    expected_chance = float((torch.bincount(labels, minlength=4).double() * predicted).sum()) / len(labels) ** 2
    assert out.extras["chance_independent"] == pytest.approx(expected_chance)
    halves_acc = out.extras["half_accuracy"]
    sizes = out.extras["halves"]
    assert sizes == [len(parts[0]), len(parts[1])]
    assert (sizes[0] * halves_acc[0] + sizes[1] * halves_acc[1]) / sum(sizes) == pytest.approx(out.accuracy)


def test_cross_fitting_is_deterministic_for_a_seed_and_changes_with_it(noise: ProtocolContext):
    a = run_protocol("aligned", noise, seed=0, transform="linear")
    b = run_protocol("aligned", noise, seed=0, transform="linear")
    c = run_protocol("aligned", noise, seed=1, transform="linear")
    assert torch.equal(a.predictions, b.predictions) and a.extras == b.extras
    assert not torch.equal(a.predictions, c.predictions)


# --- (d) cells and their stored names ------------------------------------------------------------------------


def test_expand_cells_names_the_fit_and_the_control():
    cells = expand_cells(["current", "aligned"], [5], 2, ["orthogonal", "procrustes"])
    assert cells == [
        ("current", "current", {}, 0, 0),
        ("aligned:orthogonal", "aligned", {"transform": "orthogonal", "fit": "cross", "control": "none"}, 0, 0),
        ("aligned-control:orthogonal", "aligned",
         {"transform": "orthogonal", "fit": "cross", "control": "shuffled"}, 0, 0),
        ("aligned:procrustes", "aligned", {"transform": "procrustes", "fit": "cross", "control": "none"}, 0, 0),
        ("aligned-control:procrustes", "aligned",
         {"transform": "procrustes", "fit": "cross", "control": "shuffled"}, 0, 0),
    ]  # fmt: skip
    in_sample = expand_cells(["aligned"], [5], 2, ["affine"], {"aligned": {"fit": "in_sample", "steps": 5}})
    assert [c[0] for c in in_sample] == ["aligned-insample:affine", "aligned-insample-control:affine"]
    assert all(c[2]["fit"] == "in_sample" for c in in_sample)
    only = expand_cells(["aligned"], [5], 2, ["affine"], {"aligned": {"control": "none"}})
    assert [c[0] for c in only] == ["aligned:affine"]
    with pytest.raises(ConfigError, match="'fit' must be one of cross, in_sample"):
        expand_cells(["aligned"], [5], 2, ["affine"], {"aligned": {"fit": "insample"}})
    with pytest.raises(ConfigError, match="'control' must be one of none, shuffled"):
        expand_cells(["aligned"], [5], 2, ["affine"], {"aligned": {"control": "permuted"}})


def test_report_labels_and_figure_handle_every_aligned_name(tmp_path):
    from mergelab.bench.report import aligned_table, figure_aligned, markdown_table, protocol_label

    assert protocol_label("aligned:orthogonal") == "Aligned orthogonal (cross-fitted)"
    assert "in-sample" in protocol_label("aligned-insample:affine")
    assert "control" in protocol_label("aligned-control:affine") and "cross-fitted" in protocol_label(
        "aligned-control:affine"
    )
    assert "in-sample" in protocol_label("aligned-insample-control:affine")
    rows = [{"model": "finetuned", "method": "individual", "protocol": "current", "task": t, "seed": 0, "shots": 0,
             "accuracy": 0.9, "transductive": False, "extras": {}} for t in ("a", "b")]  # fmt: skip
    for name, acc in (("current", 0.6), ("aligned:affine", 0.7), ("aligned-control:affine", 0.27),
                      ("aligned-insample:affine", 0.99), ("aligned-insample-control:affine", 0.97)):  # fmt: skip
        for t in ("a", "b"):
            rows.append({"model": "merged", "method": "WA", "protocol": name, "task": t, "seed": 0, "shots": 0,
                         "accuracy": acc, "transductive": name != "current",
                         "extras": {"chance_majority": 0.25} if name != "current" else {}})  # fmt: skip
    png = figure_aligned(rows)
    assert png and png[:4] == b"\x89PNG"
    table = markdown_table(aligned_table(rows))
    line = next(line for line in table.splitlines() if line.startswith("| WA | affine"))
    assert "| 70.0 | 27.0 | 25.0 | ✓ | 99.0 | 97.0 |" in line
    rows = [r for r in rows if r["protocol"] != "aligned-control:affine"] + [
        {**r, "protocol": "aligned-control:affine", "accuracy": 0.4} for r in rows if r["protocol"] == "aligned:affine"
    ]
    assert "⚠ 15.0 pt from chance" in markdown_table(aligned_table(rows))


# --- the fast solvers solve the same problems ----------------------------------------------------------------


def test_fast_solvers_reach_the_adam_objective_or_lower():
    g = torch.Generator().manual_seed(5)
    n, d = 160, 24
    x = torch.randn(n, d, generator=g)
    y = 0.8 * x @ random_orthogonal(d, g).T + 0.3 * torch.randn(n, d, generator=g)
    for family in ("affine", "linear", "invertible", "euclidean", "orthogonal", "scaling"):
        _, adam = aligned_mod.fit_transform(x, y, family, solver="adam")
        fitted, fast = aligned_mod.fit_transform(x, y, family)
        assert fast["solver"] == "fast" and adam["solver"] == "adam"
        assert fast["final_loss"] <= adam["final_loss"] * 1.002, (family, fast["final_loss"], adam["final_loss"])
        if family in ("euclidean", "orthogonal"):
            a = fitted.matrix.double()
            assert float((a.T @ a - torch.eye(d, dtype=a.dtype)).abs().max()) < 1e-5


def test_weighted_median_scaling_is_the_exact_l1_optimum():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(41, 3, generator=g), torch.randn(41, 3, generator=g)
    x[0, 1] = 0.0  # a zero input contributes a constant
    fitted = aligned_mod.weighted_median_scaling(x, y)
    scale = torch.diagonal(fitted.matrix)
    for j in range(3):
        candidates = (y[:, j] / x[:, j])[x[:, j] != 0]
        best = min(float((s * x[:, j] - y[:, j]).abs().sum()) for s in candidates)  # optimum is at a ratio
        assert float((scale[j] * x[:, j] - y[:, j]).abs().sum()) == pytest.approx(best, rel=1e-6)


def test_invertible_completes_a_singular_linear_solution_without_changing_the_fit():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)  # N < d: linear L1 fit is singular
    linear, _ = aligned_mod.fit_transform(x, y, "linear")
    fitted, info = aligned_mod.fit_transform(x, y, "invertible")
    assert info["invertible_by"] == "completed"
    sign, logabsdet = torch.linalg.slogdet(fitted.matrix.double())
    assert float(sign) != 0.0 and math.isfinite(float(logabsdet))
    assert torch.allclose(fitted(x), linear(x), atol=1e-4)  # unchanged on every fitted input
    assert info["final_loss"] < 1e-4  # N < d: the L1 fit interpolates


def test_option_errors():
    ctx = task(n=40, d=8, classes=2, seed=2, merged="rotated")
    with pytest.raises(ConfigError, match="'fit' must be one of"):
        run_protocol("aligned", ctx, fit="insample")
    with pytest.raises(ConfigError, match="'control' must be one of"):
        run_protocol("aligned", ctx, control="permuted")
    with pytest.raises(ConfigError, match="option 'solver' must be one of fast, adam, got 'lbfgs'"):
        run_protocol("aligned", ctx, solver="lbfgs")
    with pytest.raises(ConfigError, match="set solver: adam"):
        run_protocol("aligned", ctx, transform="orthogonal", alpha=0.5)
    with pytest.raises(ConfigError, match="init must be one of"):
        run_protocol("aligned", ctx, transform="orthogonal", init="ridge")
    with pytest.raises(ConfigError, match="has no initialisation"):
        run_protocol("aligned", ctx, transform="affine", init="ridge")
    out = run_protocol("aligned", ctx, transform="orthogonal", solver="adam", alpha=0.5, steps=20)
    assert out.extras["solver"] == "adam"
