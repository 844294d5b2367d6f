"""The `eval` command's table: built from the one summary, in the order evaluated, † on transductive protocols;
it takes the API's dict rows (no method) and ResultRows alike."""

from __future__ import annotations

from rich.console import Console

from mergelab.cli.evaluate import protocol_table
from mergelab.evaluation.results import ResultRow


def api_rows() -> list[dict]:
    rows = []
    for i, task in enumerate(("t0", "t1")):
        base = {"model": "merged", "task": task, "normalized_accuracy": None, "extras": {}}
        rows.append({**base, "protocol": "knn", "seed": 0, "shots": 2, "accuracy": 0.5, "transductive": False})
        rows.append({**base, "protocol": "knn", "seed": 1, "shots": 2, "accuracy": 0.6, "transductive": False})
        rows.append({**base, "protocol": "current", "seed": 0, "shots": 0, "accuracy": 0.7, "transductive": False})
        rows.append({**base, "protocol": "aligned:procrustes", "seed": i, "shots": 0, "accuracy": 0.9 - i / 10,
                     "transductive": True})  # fmt: skip
    return rows


def text(table) -> str:
    console = Console(record=True, width=140)
    console.print(table)
    return console.export_text()


def test_eval_table_from_the_summary():
    out = text(protocol_table(api_rows()))
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == ["KNN", "Current", "Aligned procrustes (cross-fitted) †"]
    assert "│ 55.0 ± 5.0 │ 55.0 ± 5.0 │ 55.0 ± 5.0 │" in lines[0] and "│ 70.0       │ 70.0       │ 70.0" in lines[1]
    assert "85.0 ‡" in lines[2]  # no seed shared by the aligned cells of t0 and t1: the mean of the task means
    rows = [ResultRow.from_dict({"method": "merged", **r}) for r in api_rows()]
    assert text(protocol_table(rows)) == out
