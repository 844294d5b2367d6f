"""The report's new sections: does the protocol change the verdict (ranks, Kendall τ, biggest movers), the
FT-Classifier solvers' KL, and the experts-as-upper-bounds table, on hand-checked examples."""

from __future__ import annotations

import math

import pytest

from mergelab.bench.report import (
    biggest_movers,
    build_report,
    expert_verdict,
    experts_table,
    ft_kl_table,
    kendall_matrix,
    main_table,
    markdown_table,
    protocol_label,
    rank_methods,
    verdict_scores,
    verdict_section,
)
from mergelab.bench.report.markdown import markdown_blocks
from mergelab.bench.store import ResultStore

# current: A > B > C > D.  knn swaps C and D (1 discordant pair of 6: τ = (5 - 1)/6 = 2/3).  ft reverses the
# order (τ = -1).  knn vs ft: only (C, D) is concordant: τ = (1 - 5)/6 = -2/3.  The probe ties A and B: τ-b with
# current = (5 - 0)/√(6 · 5) = 5/√30.  The aligned family scored only A and B, in current's order: τ = 1.
SCORES = {
    "current": {"A": 0.9, "B": 0.8, "C": 0.7, "D": 0.6},
    "knn": {"A": 0.9, "B": 0.8, "C": 0.6, "D": 0.7},
    "ft_classifier": {"A": 0.6, "B": 0.7, "C": 0.8, "D": 0.9},
    "linear_probe": {"A": 0.8, "B": 0.8, "C": 0.5, "D": 0.4},
    "aligned:orthogonal": {"A": 0.95, "B": 0.5},
}


def test_rank_methods_best_first_with_shared_ranks_for_ties():
    assert rank_methods(SCORES["current"]) == {"A": 1, "B": 2, "C": 3, "D": 4}
    assert rank_methods(SCORES["linear_probe"]) == {"A": 1.5, "B": 1.5, "C": 3, "D": 4}
    assert rank_methods({"x": 0.5, "y": 0.5, "z": 0.5}) == {"x": 2, "y": 2, "z": 2}


def test_kendall_matrix_hand_checked():
    taus = kendall_matrix(SCORES)
    assert taus[("current", "current")] == pytest.approx(1.0)
    assert taus[("current", "knn")] == pytest.approx(2 / 3)
    assert taus[("current", "ft_classifier")] == pytest.approx(-1.0)
    assert taus[("knn", "ft_classifier")] == pytest.approx(-2 / 3)
    assert taus[("current", "linear_probe")] == pytest.approx(5 / math.sqrt(30))
    assert taus[("current", "aligned:orthogonal")] == pytest.approx(1.0)  # over the two shared methods
    assert math.isnan(taus[("linear_probe", "aligned:orthogonal")])  # the probe ties the only shared pair
    assert all(taus[(a, b)] == pytest.approx(taus[(b, a)], nan_ok=True) for a in SCORES for b in SCORES)
    flat = kendall_matrix({"p": {"A": 0.5, "B": 0.5}, "q": {"A": 0.1, "B": 0.2}, "r": {"A": 0.3}})
    assert math.isnan(flat[("p", "q")]) and math.isnan(flat[("q", "r")])  # constant ranking; one shared method


def test_biggest_movers_hand_checked():
    movers = biggest_movers(SCORES)
    assert "current" not in movers
    assert movers["knn"] == [("C", 3, 4), ("D", 4, 3)]
    assert movers["ft_classifier"] == [("A", 1, 4), ("D", 4, 1)]
    assert movers["linear_probe"] == [("A", 1, 1.5), ("B", 2, 1.5)]
    assert movers["aligned:orthogonal"] == []  # A, B keep their order among the two
    assert biggest_movers({"knn": {"A": 1.0}}) == {}  # no Current: nothing to compare with


def _row(method, protocol, task, seed, shots, accuracy, model="merged", extras=None):
    return {"model": model, "method": method, "params": "{}", "protocol": protocol, "task": task, "seed": seed,
            "shots": shots, "accuracy": accuracy, "normalized_accuracy": None, "transductive": protocol.startswith(
                "aligned"), "split": "test", "extras": extras or {}}  # fmt: skip


def _rows() -> list[dict]:
    rows = []
    for protocol, scores in SCORES.items():
        for method, value in scores.items():
            few = protocol in ("knn", "ft_classifier", "linear_probe")
            for seed in (0, 1) if few else (0,):
                for task, shift in (("t0", 0.05), ("t1", -0.05)):  # task average = value; seeds ± 0.01
                    noise = (0.01 if seed else -0.01) if few else 0.0
                    rows.append(_row(method, protocol, task, seed, 5 if few else 0, value + shift + noise))
                    if few:  # another shot count, which the verdict at 5 shots must ignore
                        rows.append(_row(method, protocol, task, seed, 1, 0.25))
    return rows


def test_verdict_scores_from_rows_and_the_section():
    scores = verdict_scores(_rows(), shots=5, methods=["A", "B", "C", "D"])
    assert set(scores) == set(SCORES)
    for protocol, expected in SCORES.items():
        assert scores[protocol] == pytest.approx(expected)
    text = markdown_blocks(verdict_section(_rows(), shots=5, methods=["A", "B", "C", "D"]))
    assert "| τ |" in text and "+0.67" in text and "-1.00" in text
    assert "| A | 1 (90.0) | 1 (90.0) | 4 (60.0) | 1.5 (80.0) | 1 (95.0) |" in text
    assert "A 1 → 4; D 4 → 1" in text and "no rank moves" in text
    assert protocol_label("aligned:orthogonal") + " †" in text and "Current †" not in text  # † marks transductive
    assert verdict_section([r for r in _rows() if r["method"] == "A"], shots=5) == ()  # one method: no ranking


def test_ft_kl_table_and_main_table_show_both_solvers():
    rows = []
    for seed, (ref_kl, conv_kl) in enumerate(((0.9, 0.01), (0.7, 0.03))):
        for task in ("t0", "t1"):
            rows.append(
                _row(
                    "A",
                    "ft_classifier",
                    task,
                    seed,
                    5,
                    0.6,
                    extras={"solver": "reference", "initial_kl": 1.0, "final_kl": ref_kl, "iterations": 50},
                )
            )
            rows.append(_row("A", "ft_classifier:converged", task, seed, 5, 0.8,
                             extras={"solver": "converged", "initial_kl": 1.0, "final_kl": conv_kl, "iterations": 30,
                                     "converged": seed == 0}))  # fmt: skip
    table = markdown_table(ft_kl_table(rows))
    assert "| merged | 5 | FT-Classifier (reference schedule) | 4 | 1 | 0.8 | 0.9 | 50 | – |" in table
    assert "| merged | 5 | FT-Classifier (converged, L-BFGS) | 4 | 1 | 0.02 | 0.03 | 30 | 2/4 |" in table
    assert ft_kl_table([_row("A", "ft_classifier", "t0", 0, 5, 0.5)]) is None  # an older run: no KL recorded
    labels = [label for label, _, _ in main_table(rows, ["t0", "t1"], 5)]
    assert labels == [
        "A + FT-Classifier (reference schedule) (5-shot)",
        "A + FT-Classifier (converged, L-BFGS) (5-shot)",
    ]
    assert protocol_label("ft_classifier:converged") == "FT-Classifier (converged, L-BFGS)"


EXPERTS = {
    "news": {"test_accuracy": 0.91, "probe_accuracy": 0.85, "majority_rate": 0.25, "losses": [1.4, 0.9, 0.5, 0.4],
             "head_shift": 0.1234, "steps": 4, "below_probe": False, "below_majority": False, "recipe": {"lr": 1e-4}},
    "reviews": {"test_accuracy": 0.53, "probe_accuracy": 0.71, "majority_rate": 0.53, "losses": [0.7, 0.69, 0.69],
                "head_shift": 0.002, "steps": 3, "below_probe": True, "below_majority": True, "recipe": {}},
    "spam": {"test_accuracy": 0.80, "probe_accuracy": 0.82, "majority_rate": 0.6, "head_shift": 0.5, "steps": 9},
}  # fmt: skip


def test_experts_table_flags_experts_that_are_no_upper_bound():
    table = markdown_table(experts_table(EXPERTS))
    lines = table.splitlines()
    assert lines[0] == ("| task | expert test acc (%) | frozen-encoder probe (%) | majority rate (%) | "
                        "head moved ‖W−W₀‖/‖W₀‖ | steps | verdict |")  # fmt: skip
    assert lines[2] == "| news | 91.0 | 85.0 | 25.0 | 0.123 | 4 | ✓ |"
    assert lines[3] == "| reviews | 53.0 | 71.0 | 53.0 | 0.002 | 3 | ⚠ below probe, below majority |"
    assert lines[4] == "| spam | 80.0 | 82.0 | 60.0 | 0.500 | 9 | ⚠ below probe |"  # flags missing: from the numbers
    assert expert_verdict({}) == "✓" and experts_table({}) is None


def test_report_renders_the_new_sections(tmp_path):
    rows = [{**r, "key": f"k{i}"} for i, r in enumerate(_rows())]
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.add_rows(rows)
        store.set_meta("experts", EXPERTS)
    paths = build_report(tmp_path)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    for heading in ("## Experts: are the upper bounds bounds?", "## Does the protocol change the verdict?"):
        assert heading in md and f"<h2>{heading[3:]}</h2>" in page
    assert (tmp_path / "fig_expert_losses.png").exists()
    assert '<td class="warn">⚠ below probe, below majority</td>' in page and "<th>τ</th>" in page
    assert "<p>|" not in page and "---|" not in page  # every Markdown table became an HTML table
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.set_meta("experts", {})
    assert "## Experts" not in build_report(tmp_path)["markdown"].read_text()  # no experts recorded: no section
