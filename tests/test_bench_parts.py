"""The bench's parts without a run: grid candidates, the few-shot pool, the frozen expert pool, cell keys and rows,
the results store's ResultRow interface, and `mergelab bench`'s routing of built-in names."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergelab.bench.cells import Subject, protocol_cells, subject_cell_key, subject_row
from mergelab.bench.config import ExperimentConfig, MethodSpec
from mergelab.bench.methods import is_transductive, validate_method_params
from mergelab.bench.pool import Expert, ExpertPool, fewshot_pool, fewshot_pool_sizes
from mergelab.bench.selection import grid_candidates, once
from mergelab.bench.store import CSV_COLUMNS, ResultStore, cell_key
from mergelab.cli import app
from mergelab.core.errors import ConfigError
from mergelab.evaluation.protocols.common import ProtocolOutcome
from mergelab.evaluation.results import ModelKind, ResultRow
from tests._text_helpers import make_task


def test_grid_candidates_cover_the_grid_over_the_fixed_params():
    spec = MethodSpec(name="ties", params={"density": 0.2}, grid={"scale": [0.3, 0.5], "scope": ["global", "layer"]})
    assert grid_candidates(spec) == [
        {"density": 0.2, "scale": 0.3, "scope": "global"}, {"density": 0.2, "scale": 0.3, "scope": "layer"},
        {"density": 0.2, "scale": 0.5, "scope": "global"}, {"density": 0.2, "scale": 0.5, "scope": "layer"},
    ]  # fmt: skip
    assert grid_candidates(MethodSpec(name="weight_average")) == [{}]


def test_once_builds_at_most_once():
    calls: list[int] = []
    get = once(lambda: calls.append(1) or len(calls))
    assert get() == 1 and get() == 1 and calls == [1]


def test_fewshot_pool_is_stratified_seeded_and_leaves_the_other_splits():
    task = make_task("t", num_classes=3, per_class=12, seed=0)
    pool = fewshot_pool(task, per_class=4, seed=0)
    labels = pool.splits["train"].labels
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert set(pool.splits["train"].texts) <= set(task.splits["train"].texts)
    assert pool.splits["test"] is task.splits["test"] and pool.splits["validation"] is task.splits["validation"]
    assert fewshot_pool(task, 4, 0).splits["train"].texts == pool.splits["train"].texts  # same seed, same pool
    assert fewshot_pool(task, 4, 1).splits["train"].texts != pool.splits["train"].texts
    assert fewshot_pool_sizes({"t": pool}, 4) == {"t": {"per_class": 4, "size": 12, "smallest_class": 4}}


def test_the_expert_pool_is_frozen():
    head = torch.nn.Linear(2, 2)
    expert = Expert("t", Path("e"), "fp", head, head)
    pool = ExpertPool(Path("base"), types.MappingProxyType({}), types.MappingProxyType({"t": expert}), Path("c"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.base_path = Path("other")  # type: ignore[misc]
    with pytest.raises(TypeError, match="does not support item assignment"):
        pool.experts["u"] = expert  # type: ignore[index]


def test_cell_keys_are_what_the_store_has_always_used():
    subject = Subject(ModelKind.MERGED, "ties", {"scale": 0.5, "density": 0.2})
    key = subject_cell_key("run0", subject, "knn", "news", 1, 5)
    assert key == cell_key(run="run0", model="merged", method="ties", params={"density": 0.2, "scale": 0.5},
                           protocol="knn", task="news", seed=1, shots=5, split="test")  # fmt: skip
    assert key == ('{"method":"ties","model":"merged","params":{"density":0.2,"scale":0.5},"protocol":"knn",'
                   '"run":"run0","seed":1,"shots":5,"split":"test","task":"news"}')  # fmt: skip


def test_protocol_cells_add_the_configured_options():
    cfg = ExperimentConfig(tasks=[{"name": "t"}], protocols=["current", "knn"], shots=[1, 5], seeds=2,
                           protocol_options={"knn": {"chunk_size": 3}})  # fmt: skip
    cells = protocol_cells(cfg, ["current", "knn"])
    assert cells[0] == ("current", "current", {}, 0, 0)
    assert [(seed, shots) for _, p, _, seed, shots in cells if p == "knn"] == [(0, 1), (0, 5), (1, 1), (1, 5)]
    assert all(options == {"chunk_size": 3} for _, p, options, _, _ in cells if p == "knn")


def test_a_row_is_transductive_if_its_outcome_protocol_or_subject_is():
    outcome = ProtocolOutcome(accuracy=0.6, predictions=torch.zeros(3), transductive=False, extras={"k": 1})
    plain = Subject(ModelKind.PRETRAINED, "pretrained")
    row = subject_row(plain, "news", ("knn", "knn", {}, 1, 5), outcome, 0.8)
    assert row == ResultRow(model="pretrained", method="pretrained", params="{}", protocol="knn", task="news", seed=1,
                            shots=5, accuracy=0.6, normalized_accuracy=0.6 / 0.8, extras={"k": 1})  # fmt: skip
    assert subject_row(plain, "news", ("aligned:procrustes", "aligned", {}, 0, 0), outcome, 0.8).transductive
    learned = Subject(ModelKind.MERGED, "adamerging", transductive=True)
    assert subject_row(learned, "news", ("knn", "knn", {}, 1, 5), outcome, None).transductive
    assert subject_row(plain, "news", ("knn", "knn", {}, 1, 5), outcome, None).normalized_accuracy is None
    flagged = dataclasses.replace(outcome, transductive=True)
    assert subject_row(plain, "news", ("knn", "knn", {}, 1, 5), flagged, 0.8).transductive


def test_the_store_takes_result_rows_by_key_and_gives_the_same_rows_back(tmp_path):
    row = ResultRow(model=ModelKind.MERGED.value, method="ties", params='{"scale": 0.5}', protocol="knn", task="news",
                    seed=1, shots=5, accuracy=0.75, normalized_accuracy=0.9, transductive=True,
                    extras={"gap": torch.tensor(0.25).item(), "weights": [0.5, 0.5]})  # fmt: skip
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.add({"k1": row})
        assert store.has("k1") and not store.has("k2")
        (stored,) = store.rows()
        store.add_rows([{**stored, "key": "k2", "seed": 2}])  # the dict form `rows()` returns
        assert len(store.rows()) == 2
        with pytest.raises(sqlite3.IntegrityError):  # one bad row: nothing of the batch is stored
            store.add({"k3": row, "k4": dataclasses.replace(row, accuracy=None)})
        assert not store.has("k3")
        store.export_csv(tmp_path / "results.csv")
    assert stored == {"key": "k1", **row.to_dict()}
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == list(CSV_COLUMNS)
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        values = conn.execute("SELECT model, transductive, extras FROM results WHERE key = 'k1'").fetchone()
    assert values == ("merged", 1, json.dumps({"gap": 0.25, "weights": [0.5, 0.5]}))


@pytest.fixture
def fake_pleas(monkeypatch):
    """A stand-in ``mergelab.bench.pleas_runner`` that records how `mergelab bench pleas` calls it."""
    calls: list[tuple] = []

    def run_pleas(run_dir, cache_dir=None, log=print, budgets=(1.0, 1.2, 1.5, 2.0)):  # noqa: ANN001, ANN202
        calls.append((Path(run_dir), cache_dir, tuple(budgets)))
        return Path(run_dir) / "report.md"

    module = types.ModuleType("mergelab.bench.pleas_runner")
    module.run_pleas = run_pleas  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mergelab.bench.pleas_runner", module)
    return calls


def test_bench_pleas_runs_the_pleas_runner(tmp_path, fake_pleas):
    result = CliRunner().invoke(app, ["bench", "pleas", "--out", str(tmp_path / "p"), "--budgets", "1.0,1.5"])
    assert result.exit_code == 0, result.output
    assert fake_pleas == [(tmp_path / "p", None, (1.0, 1.5))]
    assert f"report: {tmp_path / 'p' / 'report.md'}" in result.output
    result = CliRunner().invoke(app, ["bench", "pleas", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0 and fake_pleas[-1] == (tmp_path / "v", None, (1.0, 1.2, 1.5, 2.0))
    result = CliRunner().invoke(app, ["bench", "pleas", "--out", str(tmp_path / "w"), "--budgets", "1.0,x"])
    assert result.exit_code == 1 and "--budgets must be comma-separated numbers, got '1.0,x'" in result.output


def test_bench_names_an_unknown_experiment_and_the_built_in_ones(tmp_path):
    result = CliRunner().invoke(app, ["bench", "fulll", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "no experiment 'fulll': no such YAML file, and no built-in one of that name (demo, full, vision, pleas)" in result.output
    result = CliRunner().invoke(app, ["bench", "pleas", "--out", str(tmp_path / "x"), "--budgets", "1.0,wide"])
    assert result.exit_code == 1 and "--budgets must be comma-separated numbers, got '1.0,wide'" in result.output


def test_the_method_registry_is_asked_in_one_place():
    assert is_transductive("adamerging") and not is_transductive("regmean") and not is_transductive("ties")
    validate_method_params("ties", {"density": 0.2, "scale": 0.5}, 2)
    validate_method_params("regmean", {"alpha": 0.9}, 2)
    with pytest.raises(ConfigError, match="unknown merge method 'tiez'"):
        validate_method_params("tiez", {}, 2)
    with pytest.raises(ConfigError, match="density"):
        validate_method_params("ties", {"density": 3}, 2)
