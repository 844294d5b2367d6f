"""Result rows and summaries, checked against hand-computed means and stds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from mergelab.core.errors import DataError
from mergelab.evaluate.protocols.common import ProtocolOutcome
from mergelab.evaluate.results import (
    ResultRow,
    format_cell,
    normalized,
    pivot_table,
    protocol_label,
    render_table,
    summarize,
    table_text,
)


def row(
    protocol: str,
    task: str,
    seed: int,
    acc: float,
    *,
    shots: int = 5,
    norm: float | None = None,
    model: str = "ta",
    transductive: bool = False,
) -> ResultRow:
    return ResultRow(
        model=model,
        method="task_arithmetic",
        params='{"lambda": 0.3}',
        protocol=protocol,
        task=task,
        seed=seed,
        shots=shots,
        accuracy=acc,
        normalized_accuracy=norm,
        transductive=transductive,
    )


def hand_rows() -> list[ResultRow]:
    rows = [
        # knn, 3 seeds on two tasks
        row("knn", "ag", 0, 0.80, norm=0.80 / 0.9),
        row("knn", "ag", 1, 0.90, norm=1.0),
        row("knn", "ag", 2, 0.70, norm=0.70 / 0.9),
        row("knn", "yelp", 0, 0.50, norm=1.0),
        row("knn", "yelp", 1, 0.40, norm=0.8),
        row("knn", "yelp", 2, 0.60, norm=1.2),
        # current: deterministic, one seed, stored with shots 0
        row("current", "ag", 0, 0.60, shots=0),
        row("current", "yelp", 0, 0.30, shots=0),
        # aligned: transductive
        row("aligned:orthogonal", "ag", 0, 0.88, shots=0, transductive=True),
        row("aligned:orthogonal", "yelp", 0, 0.55, shots=0, transductive=True),
    ]
    return rows


def pick(summary, protocol: str, task: str):
    found = summary[(summary["protocol"] == protocol) & (summary["task"] == task)]
    assert len(found) == 1
    return found.iloc[0]


def test_row_to_dict_and_from_outcome():
    outcome = ProtocolOutcome(0.75, torch.tensor([0, 1]), True, {"l1_after": 0.1})
    made = ResultRow.from_outcome(
        outcome,
        model="ta",
        method="task_arithmetic",
        params={"b": 1, "a": 2},
        protocol="aligned",
        task="ag",
        seed=0,
        shots=0,
        finetuned_accuracy=0.9,
    )
    data = made.to_dict()
    assert data["params"] == '{"a": 2, "b": 1}' and data["normalized_accuracy"] == pytest.approx(0.75 / 0.9)
    assert data["transductive"] is True and data["extras"] == {"l1_after": 0.1} and data["split"] == "test"
    json.dumps(data)
    unknown = ResultRow.from_outcome(
        outcome, model="m", method="m", params=None, protocol="p", task="t", seed=0, shots=1
    )
    assert unknown.normalized_accuracy is None and unknown.params == "{}"


def test_normalized_and_labels():
    assert normalized(0.45, 0.9) == pytest.approx(0.5)
    assert normalized(0.45, None) is None and normalized(0.45, 0.0) is None
    assert protocol_label("knn") == "knn"
    assert protocol_label("aligned", {"transform": "orthogonal"}) == "aligned:orthogonal"
    assert (
        protocol_label("aligned", {"transform": "orthogonal", "alpha": 1})
        == "aligned:alpha=1,transform=orthogonal"
    )


def test_summarize_mean_std_over_seeds():
    summary = summarize(hand_rows())
    ag = pick(summary, "knn", "ag")
    assert ag["mean"] == pytest.approx(0.80) and ag["n_seeds"] == 3
    assert ag["std"] == pytest.approx(math.sqrt(((0.0) ** 2 + 0.1**2 + 0.1**2) / 3))  # population std
    yelp = pick(summary, "knn", "yelp")
    assert yelp["mean"] == pytest.approx(0.50) and yelp["std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert yelp["normalized_mean"] == pytest.approx(1.0) and yelp["normalized_std"] == pytest.approx(
        math.sqrt(0.08 / 3)
    )
    cur = pick(summary, "current", "ag")
    assert cur["mean"] == pytest.approx(0.60) and cur["std"] == 0.0 and math.isnan(cur["normalized_mean"])


def test_task_average_is_per_seed_then_over_seeds():
    summary = summarize(hand_rows())
    avg = pick(summary, "knn", "average")
    per_seed = [(0.80 + 0.50) / 2, (0.90 + 0.40) / 2, (0.70 + 0.60) / 2]  # 0.65 each
    assert avg["mean"] == pytest.approx(sum(per_seed) / 3) and avg["std"] == pytest.approx(0.0)
    assert avg["n_seeds"] == 3
    per_seed_norm = [(0.80 / 0.9 + 1.0) / 2, (1.0 + 0.8) / 2, (0.70 / 0.9 + 1.2) / 2]
    mean_norm = sum(per_seed_norm) / 3
    assert avg["normalized_mean"] == pytest.approx(mean_norm)
    assert avg["normalized_std"] == pytest.approx(
        math.sqrt(sum((v - mean_norm) ** 2 for v in per_seed_norm) / 3)
    )
    assert pick(summary, "current", "average")["mean"] == pytest.approx(0.45)
    assert bool(pick(summary, "aligned:orthogonal", "average")["transductive"])


def test_task_average_without_a_shared_seed():
    rows = [row("knn", "ag", 0, 0.8), row("knn", "yelp", 1, 0.4), row("knn", "yelp", 2, 0.6)]
    avg = pick(summarize(rows), "knn", "average")
    assert avg["mean"] == pytest.approx((0.8 + 0.5) / 2) and math.isnan(avg["std"]) and avg["n_seeds"] == 0


def test_summarize_accepts_store_dicts_and_separates_models():
    dicts = [r.to_dict() for r in hand_rows()] + [row("knn", "ag", 0, 0.1, model="wa").to_dict()]
    summary = summarize(dicts)
    assert set(summary["model"]) == {"ta", "wa"}
    assert pick(summary[summary["model"] == "wa"], "knn", "ag")["mean"] == pytest.approx(0.1)
    with pytest.raises(DataError, match="no result rows"):
        summarize([])
    validation = {**hand_rows()[0].to_dict(), "split": "validation"}
    with pytest.raises(DataError, match="mix the splits"):
        summarize([*dicts, validation])


def test_tables():
    summary = summarize(hand_rows())
    table = pivot_table(summary, model="ta", shots=5)
    assert list(table.index) == ["ag", "yelp", "average"]
    assert list(table.columns) == ["aligned:orthogonal*", "current", "knn"]
    assert table.loc["ag", "knn"] == "80.0 ± 8.2" and table.loc["average", "current"] == "45.0 ± 0.0"
    normalized_table = pivot_table(summary, model="ta", shots=5, normalized=True)
    assert (
        normalized_table.loc["yelp", "knn"] == "100.0 ± 16.3" and normalized_table.loc["ag", "current"] == "–"
    )
    assert "80.0 ± 8.2" in table_text(summary, model="ta", shots=5)
    console = Console(record=True, width=160)
    console.print(render_table(summary, model="ta", shots=5))
    text = console.export_text()
    assert "transductive" in text and "knn" in text and "65.0 ± 0.0" in text
    with pytest.raises(DataError, match="no results for model 'nope'"):
        pivot_table(summary, model="nope")


def test_table_picks_the_requested_shots():
    rows = hand_rows() + [row("knn", "ag", 0, 0.3, shots=1), row("knn", "yelp", 0, 0.2, shots=1)]
    summary = summarize(rows)
    assert pivot_table(summary, model="ta", shots=1).loc["ag", "knn"] == "30.0 ± 0.0"
    assert pivot_table(summary, model="ta", shots=5).loc["ag", "knn"] == "80.0 ± 8.2"
    assert pivot_table(summary, model="ta").loc["ag", "knn"] == "30.0 ± 0.0"  # smallest shots by default
    assert "knn" not in pivot_table(summary, model="ta", shots=3).columns  # not run with 3 shots
    assert (
        "current" in pivot_table(summary, model="ta", shots=3).columns
    )  # single-shots protocols always shown


def test_format_cell():
    assert format_cell(0.718, 0.002) == "71.8 ± 0.2"
    assert format_cell(0.5, float("nan")) == "50.0"
    assert format_cell(float("nan"), 0.1) == "–"
