"""Units of work run locally or as Ray tasks: same results, dependencies honoured, retries bounded, clear errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mergelab.bench.executor import (
    Done,
    ExecutorConfig,
    Unit,
    UnitFailed,
    check_graph,
    import_ray,
    run_local,
    run_units,
)
from mergelab.core.errors import ConfigError


def square(x: int) -> int:
    return x * x


def add(*values: int) -> int:
    return sum(values)


def always_fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


def dies_once(marker: str, x: int) -> int:
    """Kill the worker process the first time (no exception: the process is gone), succeed on the retry."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died once")
        os._exit(1)
    return x + 100


def graph() -> list[Unit]:
    squares = [Unit(f"sq{i}", "features", square, (i,)) for i in range(4)]
    total = Unit("total", "cells", add, deps=tuple(u.name for u in squares))
    shifted = Unit("shifted", "cells", add, (10,), deps=("total",))
    return [*squares, total, shifted]


def test_local_runs_in_order_and_passes_dependencies():
    done: list[Done] = []
    results = run_local(graph(), done.append)
    assert results == {"sq0": 0, "sq1": 1, "sq2": 4, "sq3": 9, "total": 14, "shifted": 24}
    assert [d.unit.name for d in done] == ["sq0", "sq1", "sq2", "sq3", "total", "shifted"]
    assert all(d.where.startswith("local:") for d in done)


def test_graph_errors_name_the_unit():
    with pytest.raises(ConfigError, match="two units are named 'a'"):
        check_graph([Unit("a", "other", square, (1,)), Unit("a", "other", square, (2,))])
    with pytest.raises(ConfigError, match=r"unit 'b' depends on \['c'\], which do not come before it"):
        check_graph([Unit("b", "other", add, deps=("c",)), Unit("c", "other", square, (1,))])


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"--executor ray needs Ray, which is not installed: pip install 'mergelab\[ray\]'"):
        import_ray()
    with pytest.raises(ConfigError, match="mergelab\\[ray\\]"):
        run_units(graph(), lambda done: None, ExecutorConfig(kind="ray"))


def test_executor_config_validates():
    config = ExecutorConfig(kind="ray", resources={"finetune": {"num_gpus": 1}})
    assert config.resources_of("finetune").num_gpus == 1 and config.resources_of("cells").num_cpus == 1
    with pytest.raises(ValueError):
        ExecutorConfig(kind="slurm")


def test_ray_gives_the_local_results(local_ray):
    done: list[Done] = []
    results = run_units(graph(), done.append, ExecutorConfig(kind="ray"))
    assert results == run_local(graph(), lambda d: None)
    assert sorted(d.unit.name for d in done) == sorted(results)
    assert all(d.where.startswith("ray:") for d in done)
    names = [d.unit.name for d in done]
    assert names.index("total") > max(names.index(f"sq{i}") for i in range(4)) and names[-1] == "shifted"


def test_a_worker_killed_mid_unit_is_retried(local_ray, tmp_path):
    units = [Unit("fragile", "features", dies_once, (str(tmp_path / "marker"), 1)),
             Unit("after", "cells", add, (1,), deps=("fragile",))]  # fmt: skip
    results = run_units(units, lambda d: None, ExecutorConfig(kind="ray", max_retries=2))
    assert results == {"fragile": 101, "after": 102}
    assert (tmp_path / "marker").read_text() == "died once"


def test_a_unit_that_keeps_failing_stops_the_run_with_its_name(local_ray):
    units = [Unit("ok", "features", square, (3,)), Unit("broken", "cells", always_fails, (7,))]
    with pytest.raises(UnitFailed, match=r"unit 'broken' failed after 2 tries: ValueError: bad input 7"):
        run_units(units, lambda d: None, ExecutorConfig(kind="ray", max_retries=1))
