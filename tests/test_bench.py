"""The experiment runner end to end on tiny models and tasks; resume after kill -9; report = store; config errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from transformers import AutoModel, AutoTokenizer

from mergelab.bench.config import ExperimentConfig, load_experiment_config
from mergelab.bench.report import aggregate, build_report
from mergelab.bench.runner import run_benchmark
from mergelab.bench.store import ResultStore
from mergelab.core.errors import ConfigError
from tests._text_helpers import make_task, tiny_classifier

REPO = Path(__file__).resolve().parents[1]


def write_task_folder(task, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for split, data in task.splits.items():
        pd.DataFrame({"text": data.texts, "label": [task.label_names[y] for y in data.labels]}).to_csv(
            folder / f"{split}.csv", index=False)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    base = tiny_classifier("bert", root / "cls")
    bare = root / "base"
    AutoModel.from_pretrained(base).save_pretrained(bare)
    AutoTokenizer.from_pretrained(base).save_pretrained(bare)
    tasks = [write_task_folder(make_task(f"t{i}", num_classes=2 + i, per_class=10, seed=i), root / f"t{i}") for i in range(2)]
    config = {
        "base": str(bare),
        "tasks": [{"name": f"t{i}", "path": str(p)} for i, p in enumerate(tasks)],
        "data": {"fewshot_pool_per_class": 4},
        "finetune": {"epochs": 3, "lr": 3.0e-3, "max_length": 16, "batch_size": 8},
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


def test_runner_end_to_end_and_report_equals_store(setup):
    cfg = load_experiment_config(setup["config"])
    run = setup["root"] / "run"
    report = run_benchmark(cfg, run, setup["cache"], log=lambda m: None)
    with ResultStore(run / "results.sqlite") as store:
        rows = store.rows()
        chosen = store.get_meta("chosen")
    kinds = {(r["model"], r["method"], r["protocol"]) for r in rows}
    assert ("finetuned", "individual", "current") in kinds and ("ensemble", "ensemble", "ensemble") in kinds
    assert ("pretrained", "pretrained", "knn") in kinds and ("merged", "ties", "aligned:procrustes") in kinds
    assert ("merged", "regmean", "current") in kinds  # data-dependent methods through the same runner
    assert ("merged", "fisher", "knn") in kinds and ("merged", "tall_consensus", "ft_classifier") in kinds
    assert ("mtl", "mtl", "current") in kinds  # the multi-task-learning baseline with its own heads
    neulig = {r["method"] for r in rows if r["model"] == "neulig"}
    assert neulig == {"ensemble", "merge-first", "merge-mean"}
    assert all(0.0 <= r["extras"]["top_weight"] <= 1.0 for r in rows if r["method"].startswith("merge-"))
    with ResultStore(run / "results.sqlite") as store:
        learned = store.get_meta("learned")
    tall = next(v for k, v in learned.items() if k.startswith("tall_consensus"))
    assert set(tall["lambdas"]) == {"t0", "t1"} and all(v in (0.3, 0.6) for v in tall["lambdas"].values())
    assert all(r["transductive"] for r in rows if r["method"] == "adamerging")  # learned on test inputs
    assert chosen["task_arithmetic"]["scale"] in (0.3, 1.0)  # chosen on validation and recorded
    assert all(r["transductive"] for r in rows if r["protocol"].startswith("aligned"))
    assert not any(r["transductive"] for r in rows
                   if r["protocol"] in ("current", "knn", "ft_classifier") and r["method"] != "adamerging")
    csv = pd.read_csv(run / "results.csv")
    assert {"method", "params", "protocol", "task", "seed", "shots", "accuracy", "transductive"} <= set(csv.columns)
    assert len(csv) == len(rows)
    # the report's table values are the store's values
    text = report.read_text()
    agg = aggregate(rows)
    ta = agg[("merged", "task_arithmetic", "knn", 2)]
    line = next(x for x in text.splitlines() if x.startswith("| task_arithmetic + KNN (2-shot)"))
    assert ta["t0"].text() in line and ta["Avg"].text() in line
    assert (run / "report.html").read_text().count("data:image/png;base64") >= 3
    assert (run / "fig7_surgery.png").exists()  # FT-Classifier vs Surgery (the paper's Figure 7)
    assert "| Multi-task learning |" in text and "## NeuLig: merging vs ensembling" in text
    assert "| merge-first |" in text and "## What the data-dependent merges learned" in text
    assert "## Figure 7: FT-Classifier vs Representation Surgery" in text
    surgery_shots = {(r["seed"], r["shots"]) for r in rows if r["protocol"] == "surgery" and r["method"] == "ties"}
    assert surgery_shots == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)}  # every input, and k × C inputs per (seed, k)
    neulig_avg = {m: agg[("neulig", m, "current", 0)]["Avg"].mean for m in ("ensemble", "merge-first")}
    gap_line = next(x for x in text.splitlines() if x.startswith("| merge-first |"))
    assert f"{100 * (neulig_avg['ensemble'] - neulig_avg['merge-first']):+.2f}" in gap_line  # the gap in points
    again = build_report(run)  # rebuilding from the store gives the same Markdown
    assert again["markdown"].read_text() == text


def _count_rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=0.1) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_resume_after_kill_9(setup):
    run = setup["root"] / "killed"
    cmd = [sys.executable, "-m", "mergelab.cli", "bench", str(setup["config"]), "--out", str(run),
           "--cache-dir", str(setup["cache"])]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and _count_rows(run / "results.sqlite") == 0 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _count_rows(run / "results.sqlite")
    assert partial > 0
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    with ResultStore(run / "results.sqlite") as store:
        resumed = {r["key"]: r["accuracy"] for r in store.rows()}
    with ResultStore(setup["root"] / "run" / "results.sqlite") as store:
        full = {r["key"]: r["accuracy"] for r in store.rows()}
    assert resumed.keys() == full.keys()  # nothing missing, nothing duplicated
    assert all(abs(resumed[k] - full[k]) < 1e-9 for k in full)


def test_rerun_does_no_new_work(setup):
    cfg = load_experiment_config(setup["config"])
    run = setup["root"] / "run"
    before = (run / "results.sqlite").stat().st_mtime_ns
    with ResultStore(run / "results.sqlite") as store:
        count = len(store.rows())
    run_benchmark(cfg, run, setup["cache"], log=lambda m: None, report=False)
    with ResultStore(run / "results.sqlite") as store:
        assert len(store.rows()) == count
    assert before <= (run / "results.sqlite").stat().st_mtime_ns


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
    from mergelab.bench.config import builtin_config, demo_config

    cfg = demo_config()
    assert isinstance(cfg, ExperimentConfig) and len(cfg.tasks) == 4 and cfg.seeds == 5
    full = builtin_config("full")
    assert {m.name for m in cfg.methods} < {m.name for m in full.methods}
    assert "surgery" in full.protocols and full.multitask and full.neulig is not None
    assert {"tall_consensus", "adamerging", "regmean", "fisher"} <= {m.name for m in full.methods}
    with pytest.raises(ConfigError, match="built in: demo, full"):
        builtin_config("fulll")


def test_config_protocol_names_match_the_protocol_registry():
    from mergelab.bench.config import PROTOCOLS
    from mergelab.evaluate.protocols.registry import protocol_infos

    assert set(PROTOCOLS) == set(protocol_infos())
