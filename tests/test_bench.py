"""The experiment runner end to end on tiny models and tasks; resume after kill -9; report = store; config errors."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergelab.bench import baselines, cells, selection
from mergelab.bench.config import PROTOCOLS, ExperimentConfig, builtin_config, demo_config, load_experiment_config
from mergelab.bench.report import build_report
from mergelab.bench.runner import run_benchmark
from mergelab.bench.store import CSV_COLUMNS, ResultStore
from mergelab.core.errors import ConfigError
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.protocols.registry import protocol_infos
from mergelab.evaluation.results import ModelKind, summarize
from mergelab.finetune import experts
from tests._bench_helpers import REPO, bench_command, bench_env, kill_after_first_commit
from tests._text_helpers import two_task_bench


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    config = {
        **two_task_bench(root, per_class=10, epochs=3),
        "methods": [{"name": "weight_average"}, {"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}},
                    {"name": "ties", "params": {"density": 0.5}, "grid": {"scale": [0.5]}},
                    {"name": "regmean", "params": {"num_examples": 8}},
                    {"name": "fisher", "params": {"num_examples": 4, "label_mode": "sampled"}},
                    {"name": "adamerging", "params": {"steps": 2, "num_examples": 8, "batch_size": 4}},
                    {"name": "tall_consensus", "params": {"lambdas": [0.3, 0.6]}}],
        "multitask": True,
        "neulig": {"steps": 5, "train_examples": 8, "test_examples": 8, "eval_batch_size": 4, "batch_size": 8},
        "protocols": ["current", "knn", "aligned", "ft_classifier", "ensemble", "surgery"],
        "protocol_options": {"ft_classifier": {"epochs": 2}, "aligned": {"steps": 30}, "surgery": {"steps": 20}},
        "transforms": ["procrustes", "orthogonal"],
        "shots": [1, 2],
        "seeds": 2,
        "threads": 1,
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "cache": root / "cache"}


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> dict:
    """One complete run of the setup's config, built here for the tests below; a test that writes works on a copy."""
    root = tmp_path_factory.mktemp("finished")
    report = run_benchmark(load_experiment_config(setup["config"]), root / "run", root / "cache", log=lambda m: None)
    return {"run": root / "run", "cache": root / "cache", "report": report}


def private_copy(finished: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run folder and of its (warm) cache, for one test to change."""
    return (Path(shutil.copytree(finished["run"], tmp_path / "run")),
            Path(shutil.copytree(finished["cache"], tmp_path / "cache")))  # fmt: skip


def stored_rows(run: Path) -> dict[str, tuple]:
    """Every stored row with its SQLite rowid (INSERT OR REPLACE gives a rewritten row a new one)."""
    with sqlite3.connect(run / "results.sqlite") as conn:
        return {row[1]: row for row in conn.execute("SELECT rowid, * FROM results")}


def test_runner_end_to_end_and_report_equals_store(finished, tmp_path):
    run, report = finished["run"], finished["report"]
    with ResultStore(run / "results.sqlite") as store:
        rows = store.rows()
        chosen = store.get_meta("chosen")
        learned = store.get_meta("learned")
    kinds = {(r["model"], r["method"], r["protocol"]) for r in rows}
    assert ("finetuned", "individual", "current") in kinds and ("ensemble", "ensemble", "ensemble") in kinds
    assert ("pretrained", "pretrained", "knn") in kinds and ("merged", "ties", "aligned:procrustes") in kinds
    assert ("merged", "regmean", "current") in kinds  # data-dependent methods through the same runner
    assert ("merged", "fisher", "knn") in kinds and ("merged", "tall_consensus", "ft_classifier") in kinds
    assert ("mtl", "mtl", "current") in kinds  # the multi-task-learning baseline with its own heads
    assert {r["model"] for r in rows} == {kind.value for kind in ModelKind}  # every kind of model, stored by value
    neulig = {r["method"] for r in rows if r["model"] == "neulig"}
    assert neulig == {"ensemble", "merge-first", "merge-mean"}
    assert all(0.0 <= r["extras"]["top_weight"] <= 1.0 for r in rows if r["method"].startswith("merge-"))
    tall = next(v for k, v in learned.items() if k.startswith("tall_consensus"))
    assert set(tall["lambdas"]) == {"t0", "t1"} and all(v in (0.3, 0.6) for v in tall["lambdas"].values())
    assert all(r["transductive"] for r in rows if r["method"] == "adamerging")  # learned on test inputs
    assert chosen["task_arithmetic"]["scale"] in (0.3, 1.0)  # chosen on validation and recorded
    assert all(r["transductive"] for r in rows if r["protocol"].startswith("aligned"))
    assert not any(r["transductive"] for r in rows
                   if r["protocol"] in ("current", "knn", "ft_classifier") and r["method"] != "adamerging")
    csv = pd.read_csv(run / "results.csv")
    assert list(csv.columns) == list(CSV_COLUMNS)
    assert len(csv) == len(rows)
    # the report's table values are the store's values
    text = report.read_text()
    summary = summarize(rows)
    ta = summary.find(ModelKind.MERGED, "task_arithmetic", "knn", 2)
    line = next(x for x in text.splitlines() if x.startswith("| task_arithmetic + KNN (2-shot)"))
    assert ta.get("t0").text() in line and ta.average.text() in line
    assert (run / "report.html").read_text().count("data:image/png;base64") >= 3
    assert (run / "fig7_surgery.png").exists()  # FT-Classifier vs Surgery (the paper's Figure 7)
    assert "| Multi-task learning |" in text and "## NeuLig: merging vs ensembling" in text
    assert "| merge-first |" in text and "## What the data-dependent merges learned" in text
    assert "## Figure 7: FT-Classifier vs Representation Surgery" in text
    surgery_shots = {(r["seed"], r["shots"]) for r in rows if r["protocol"] == "surgery" and r["method"] == "ties"}
    assert surgery_shots == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)}  # every input, and k × C inputs per (seed, k)
    neulig_avg = {m: summary.find(ModelKind.NEULIG, m, "current", 0).average.mean for m in ("ensemble", "merge-first")}
    gap_line = next(x for x in text.splitlines() if x.startswith("| merge-first |"))
    assert f"{100 * (neulig_avg['ensemble'] - neulig_avg['merge-first']):+.2f}" in gap_line  # the gap in points
    copy, _ = private_copy(finished, tmp_path)
    again = build_report(copy)  # rebuilding from the store gives the same Markdown
    assert again["markdown"].read_text() == text


def test_resume_after_kill_9(setup, finished, tmp_path):
    run, cache = tmp_path / "killed", Path(shutil.copytree(finished["cache"], tmp_path / "cache"))
    cmd = bench_command(setup["config"], run, cache)
    partial = kill_after_first_commit(cmd, run)
    assert partial > 0
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=bench_env())
    assert done.returncode == 0, done.stderr[-2000:]
    with ResultStore(run / "results.sqlite") as store:
        resumed = {r["key"]: r["accuracy"] for r in store.rows()}
    with ResultStore(finished["run"] / "results.sqlite") as store:
        full = {r["key"]: r["accuracy"] for r in store.rows()}
    assert len(resumed) > partial  # the second run added what the first had not stored
    assert resumed.keys() == full.keys()  # nothing missing, nothing duplicated
    assert all(abs(resumed[k] - full[k]) < 1e-9 for k in full)


def test_rerun_does_no_new_work(setup, finished, tmp_path, monkeypatch):
    run, cache = private_copy(finished, tmp_path)
    before = stored_rows(run)
    writes: list[dict] = []
    monkeypatch.setattr(ResultStore, "add", lambda self, rows: writes.append(dict(rows)))

    def recomputed(what: str):  # noqa: ANN202
        def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError(f"a finished run {what} again")

        return fail

    monkeypatch.setattr(experts, "finetune_expert", recomputed("fine-tuned an expert"))
    monkeypatch.setattr(FeatureCache, "_compute", recomputed("ran an encoder"))
    monkeypatch.setattr(selection, "validation_score", recomputed("searched a grid"))
    monkeypatch.setattr(selection, "merge_state", recomputed("merged"))
    monkeypatch.setattr(cells, "run_cell", recomputed("evaluated a stored cell"))
    monkeypatch.setattr(baselines, "get_or_train_multitask", recomputed("trained the multi-task model"))
    monkeypatch.setattr(baselines, "neulig_with_data", recomputed("trained the NeuLig router"))
    run_benchmark(load_experiment_config(setup["config"]), run, cache, log=lambda m: None, report=False)
    assert writes == []
    assert stored_rows(run) == before  # no row rewritten (a rewritten row gets a new rowid)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"methds": []}, "unknown key 'methds'"),
        ({"protocols": ["current", "telepathy"]}, "protocols"),
        ({"shots": [0]}, "shots"),
        ({"methods": [{"name": "tiez"}]}, "unknown merge method 'tiez'"),
        ({"methods": [{"name": "ties", "params": {"density": 3}}]}, "density"),
        ({"methods": [{"name": "ties", "grid": {"scope": ["layer"]}}]}, "scope"),
        ({"methods": [{"name": "regmean", "params": {"alpha": 2}}]}, "alpha"),
    ],
)
def test_config_validation_errors_name_the_problem(tmp_path, change, message):
    base = {"base": "minilm", "tasks": [{"name": "election"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, **change}))
    with pytest.raises(ConfigError, match=message):
        load_experiment_config(path)


def test_builtin_configs_are_valid():
    cfg = demo_config()
    assert isinstance(cfg, ExperimentConfig) and len(cfg.tasks) == 4 and cfg.seeds == 5
    full = builtin_config("full")
    assert {m.name for m in cfg.methods} < {m.name for m in full.methods}
    assert "surgery" in full.protocols and full.multitask and full.neulig is not None
    assert {"tall_consensus", "adamerging", "regmean", "fisher"} <= {m.name for m in full.methods}
    with pytest.raises(ConfigError, match="built in: demo, full"):
        builtin_config("fulll")


def test_config_accepts_exactly_the_registry_protocols(tmp_path):
    assert PROTOCOLS == tuple(protocol_infos())  # derived, in the registry's order
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "election"}], "protocols": list(protocol_infos())}))
    assert load_experiment_config(path).protocols == list(protocol_infos())
    path.write_text(yaml.safe_dump({"tasks": [{"name": "election"}], "protocols": ["telepathy"]}))
    with pytest.raises(ConfigError, match="protocols.0.*" + ".*".join(protocol_infos())):
        load_experiment_config(path)
