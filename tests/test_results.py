"""Result rows and summaries, checked against hand-computed means and stds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from mergelab.core.errors import DataError
from mergelab.evaluation.protocols.common import ProtocolOutcome
from mergelab.evaluation.results import (
    ResultRow,
    Summary,
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
    frame = summary.frame() if isinstance(summary, Summary) else summary
    found = frame[(frame["protocol"] == protocol) & (frame["task"] == task)]
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
    assert {key.model for key in summary} == {"ta", "wa"}
    frame = summary.frame()
    assert pick(frame[frame["model"] == "wa"], "knn", "ag")["mean"] == pytest.approx(0.1)
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


def test_row_from_dict_round_trips_through_the_store(tmp_path):
    from mergelab.bench.store import ResultStore

    made = hand_rows()[:3] + [row("aligned:orthogonal", "ag", 0, 0.5, shots=0, transductive=True)]
    made[0] = ResultRow(**{**made[0].to_dict(), "extras": {"chance_majority": 0.25}})
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.add_rows([{**r.to_dict(), "key": f"k{i}"} for i, r in enumerate(made)])
        stored = store.rows("test")
    back = sorted((ResultRow.from_dict(d) for d in stored), key=lambda r: (r.protocol, r.seed))
    assert back == sorted(made, key=lambda r: (r.protocol, r.seed))  # params, extras, transductive survive
    plain = ResultRow.from_dict({"model": "m", "method": "m", "protocol": "p", "task": "t", "seed": 0, "shots": 0,
                                 "accuracy": 0.5, "params": {"b": 1, "a": 2}, "extras": '{"x": 1}'})  # fmt: skip
    assert plain.params == '{"a": 2, "b": 1}' and plain.extras == {"x": 1} and plain.split == "test"
    with pytest.raises(DataError, match=r"result rows lack the column\(s\) method, seed"):
        ResultRow.from_dict({"model": "m", "protocol": "p", "task": "t", "shots": 0, "accuracy": 0.5})


def test_summary_named_lookups():
    from mergelab.evaluation.results import ModelKind, SummaryKey

    rows = [*hand_rows(), row("current", "ag", 0, 0.9, shots=0, model="finetuned")]
    summary = summarize(rows)
    bound = summary.find(ModelKind.FINETUNED, "task_arithmetic", "current", 0)
    assert bound is not None and bound.get("ag").mean == pytest.approx(0.9) and bound.get("yelp") is None
    knn = summary.find("ta", "task_arithmetic", "knn", 5)
    assert knn.key == SummaryKey("ta", "task_arithmetic", "knn", 5, '{"lambda": 0.3}')
    assert knn.get("average") is knn.average and knn.average.n_seeds == 3 and knn.average.text() == "65.0 ± 0.0"
    assert summary.find("ta", "task_arithmetic", "knn", 1) is None  # not run
    assert [g.key.protocol for g in summary.select(model="ta", shots=0)] == ["aligned:orthogonal", "current"]
    assert summary.find("ta", "task_arithmetic", "current").get("ag").text() == "60.0"  # one seed: no std shown
    other = ResultRow(**{**row("knn", "ag", 0, 0.1).to_dict(), "params": '{"lambda": 0.5}'})
    with pytest.raises(DataError, match="ta task_arithmetic knn \\(5 shots\\) was run with several params"):
        summarize([*rows, other]).find("ta", "task_arithmetic", "knn", 5)
    with pytest.raises(DataError, match="result rows repeat the cell .* task ag seed 0; each cell must be stored once"):
        summarize([*rows, row("knn", "ag", 0, 0.1)])


def test_no_shared_seed_average_is_the_mean_of_task_means_without_std():
    rows = [row("knn", "ag", 0, 0.8, norm=0.9), row("knn", "yelp", 1, 0.4, norm=0.5)]
    rows.append(row("knn", "yelp", 2, 0.6, norm=0.7))
    average = summarize(rows).find("ta", "task_arithmetic", "knn", 5).average
    assert average.no_shared_seed and average.n_seeds == 0 and math.isnan(average.std)
    assert average.mean == pytest.approx((0.8 + 0.5) / 2) and average.normalized_mean == pytest.approx((0.9 + 0.6) / 2)
    assert average.text() == "65.0"  # no std: the report adds its ‡ mark
    shared = summarize([*rows, row("knn", "ag", 1, 0.6)]).find("ta", "task_arithmetic", "knn", 5).average
    assert not shared.no_shared_seed and shared.n_seeds == 1 and shared.mean == pytest.approx((0.6 + 0.4) / 2)
