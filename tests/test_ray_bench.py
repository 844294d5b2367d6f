"""`mergelab bench --executor ray` on a local Ray (2 CPUs): the local executor's results row for row, a killed worker
retried, a killed driver resumed, a missing Ray named."""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from mergelab.bench import graph
from mergelab.bench.config import load_experiment_config
from mergelab.bench.executor import ExecutorConfig, Unit
from mergelab.bench.runner import run_benchmark
from mergelab.bench.store import ResultStore
from mergelab.core.errors import ConfigError
from tests._bench_helpers import bench_command, kill_after_first_commit
from tests._text_helpers import two_task_bench

RAY = ExecutorConfig(kind="ray", max_retries=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny bench (2 tasks, a grid search, a data-dependent merge, the multi-task model, NeuLig) run locally."""
    root = tmp_path_factory.mktemp("raybench")
    config = {
        **two_task_bench(root, per_class=8, epochs=2),
        "methods": [{"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}},
                    {"name": "regmean", "params": {"num_examples": 8}}],
        "multitask": True,
        "neulig": {"steps": 3, "train_examples": 8, "test_examples": 8, "eval_batch_size": 4, "batch_size": 8},
        "protocols": ["current", "knn", "ft_classifier", "ensemble"],
        "protocol_options": {"ft_classifier": {"epochs": 2}},
        "shots": [1, 2],
        "seeds": 2,
        "threads": 1,
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    run_benchmark(load_experiment_config(path), root / "local", root / "local-cache", log=lambda m: None, report=False)
    return {"root": root, "config": path, "local": root / "local", "cache": root / "local-cache"}


def csv_text(run: Path) -> str:
    return (run / "results.csv").read_text()


def test_ray_gives_the_local_results_row_for_row(local_ray, setup, tmp_path):
    cfg = load_experiment_config(setup["config"])  # a cold cache: experts fine-tuned, merges made on Ray workers
    report = run_benchmark(cfg, tmp_path / "run", tmp_path / "cache", log=lambda m: None, executor=RAY)
    assert csv_text(tmp_path / "run") == csv_text(setup["local"])
    with ResultStore(tmp_path / "run" / "results.sqlite") as ray_store, ResultStore(setup["local"] / "results.sqlite") as local:
        for key in ("chosen", "selection", "learned", "experts", "config"):
            assert ray_store.get_meta(key) == local.get_meta(key), key
        units = ray_store.get_meta("units")
    kinds = {u["kind"] for u in units.values()}
    assert kinds == {"finetune", "features", "merge", "cells", "other"}
    assert all(u["where"].startswith("ray:") for u in units.values())
    assert {"finetune:t0", "finetune:t1", "finetune:multitask", "choose:task_arithmetic", "neulig"} <= set(units)
    assert "## Where the units ran" in report.read_text()


def dies_once(marker: str, fn, *args):  # noqa: ANN001, ANN002, ANN201
    """Kill this worker's process the first time (no exception: the process is gone), run ``fn`` on the retry."""
    if not Path(marker).exists():
        Path(marker).write_text("died once")
        os._exit(1)
    return fn(*args)


def test_a_worker_killed_mid_run_is_retried(local_ray, setup, tmp_path, monkeypatch):
    real = graph.build_units

    def fragile(ctx):  # noqa: ANN001, ANN202 - the first cells unit of the merge kills its worker once
        units = real(ctx)
        i = next(i for i, u in enumerate(units) if u.name.startswith("cells:merged/task_arithmetic"))
        u = units[i]
        units[i] = Unit(u.name, u.kind, dies_once, (str(tmp_path / "marker"), u.fn, *u.args), u.deps)
        return units

    monkeypatch.setattr(graph, "build_units", fragile)
    cache = Path(shutil.copytree(setup["cache"], tmp_path / "cache"))
    run_benchmark(load_experiment_config(setup["config"]), tmp_path / "run", cache, log=lambda m: None, report=False,
                  executor=RAY)  # fmt: skip
    assert (tmp_path / "marker").read_text() == "died once"
    assert csv_text(tmp_path / "run") == csv_text(setup["local"])


def test_resume_after_killing_the_driver(local_ray, setup, tmp_path):
    """A driver joined to a running Ray (--ray-address) is killed once it committed some cells; the rerun adds
    only what is missing."""
    run, cache = tmp_path / "killed", Path(shutil.copytree(setup["cache"], tmp_path / "cache"))
    shutil.rmtree(cache / "features")  # the units have work to do
    cmd = bench_command(setup["config"], run, cache, "--executor", "ray", "--ray-address",
                        local_ray.get_runtime_context().gcs_address)  # fmt: skip
    partial = kill_after_first_commit(cmd, run)  # the driver (it joined this test's Ray, which lives on)
    assert partial > 0
    run_benchmark(load_experiment_config(setup["config"]), run, cache, log=lambda m: None, report=False, executor=RAY)
    with sqlite3.connect(run / "results.sqlite") as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM results")]
    assert len(keys) == len(set(keys)) > partial  # the rerun added what was missing, nothing twice
    assert csv_text(run) == csv_text(setup["local"])


def test_missing_ray_is_a_named_error(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"--executor ray needs Ray, which is not installed: pip install 'mergelab\[ray\]'"):
        run_benchmark(load_experiment_config(setup["config"]), tmp_path / "run", setup["cache"], log=lambda m: None,
                      executor=ExecutorConfig(kind="ray"))  # fmt: skip


def test_executor_is_configurable_but_not_part_of_the_run(setup, tmp_path):
    from mergelab.cli.bench import executor_config

    data = yaml.safe_load(setup["config"].read_text())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**data, "executor": {"kind": "ray", "resources": {"finetune": {"num_gpus": 1}}}}))
    cfg = load_experiment_config(path)
    assert cfg.executor.kind == "ray" and cfg.executor.resources_of("finetune").num_gpus == 1
    assert cfg.model_dump(mode="json") == load_experiment_config(setup["config"]).model_dump(mode="json")  # same run
    assert executor_config(cfg, None, "ray://head:10001").address == "ray://head:10001"
    assert executor_config(load_experiment_config(setup["config"]), None, "auto").kind == "ray"
    assert executor_config(cfg, "local", None).kind == "local"
    with pytest.raises(ConfigError, match="--executor must be 'local' or 'ray'"):
        executor_config(cfg, "slurm", None)
    with pytest.raises(ConfigError, match="--ray-address needs --executor ray"):
        executor_config(cfg, "local", "auto")
