"""Where a benchmark's units of work run: in this process (``local``, the default) or as Ray tasks (``ray``).

A unit is one named call (fine-tune one expert, merge and score one grid candidate, one model's features on one
task, the protocol cells of one (model, task)) with the names of the units whose results it takes. ``run_units``
runs a graph of units and hands each result to ``on_done`` in the driver as soon as it is ready, so the caller (the
only writer of the results store) commits cells as they finish. Large artefacts never travel through Ray's object
store: units write them to the content-addressed cache (a shared filesystem on a multi-node cluster) and return keys.

The local executor runs the units in the given (topological) order, exactly as a plain loop would. The Ray executor
submits every unit whose dependencies are submitted, passing the dependencies' object references as arguments, so
independent units run at once; Ray retries a unit whose worker died (``max_retries``) and, here, one that raised
(``retry_exceptions``), a bounded number of times; a unit that keeps failing stops the run with its name and error.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from mergelab.core.config import StrictModel
from mergelab.core.errors import ConfigError, MergelabError

UnitKind = Literal["finetune", "merge", "features", "cells", "other"]
RAY_EXTRA = "pip install 'mergelab[ray]'"


class UnitFailed(MergelabError):
    """A unit of work failed on every try."""


class UnitResources(StrictModel):
    """What one unit of a kind asks the cluster for."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class ExecutorConfig(StrictModel):
    """``executor:`` in a bench config (or ``--executor`` / ``--ray-address`` on the command line)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(default=None, description="ray: 'auto', 'ray://host:port', or None for a local Ray")
    max_retries: int = Field(default=2, ge=0, description="tries after the first for a unit that failed")
    resources: dict[UnitKind, UnitResources] = Field(default_factory=dict, description="per kind of unit")

    def resources_of(self, kind: UnitKind) -> UnitResources:
        return self.resources.get(kind, UnitResources())


@dataclass(frozen=True)
class Unit:
    """One call of the benchmark's graph: ``fn(*args, *results of deps, **kwargs)``."""

    name: str
    kind: UnitKind
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    deps: tuple[str, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    """A finished unit: its result and where it ran (host name, and the Ray node id on a cluster)."""

    unit: Unit
    result: Any
    where: str
    seconds: float = 0.0  # the call's own time where it ran (no scheduling, no transfer)


OnDone = Callable[[Done], None]


def check_graph(units: Sequence[Unit]) -> None:
    """Unit names are unique and every dependency names an earlier unit (the list is in topological order)."""
    seen: set[str] = set()
    for unit in units:
        if unit.name in seen:
            raise ConfigError(f"two units are named '{unit.name}'; give every unit of work its own name")
        missing = [d for d in unit.deps if d not in seen]
        if missing:
            raise ConfigError(f"unit '{unit.name}' depends on {missing}, which do not come before it")
        seen.add(unit.name)


def _call(unit: Unit, results: Sequence[Any]) -> Any:
    return unit.fn(*unit.args, *results, **dict(unit.kwargs))


def run_local(units: Sequence[Unit], on_done: OnDone) -> dict[str, Any]:
    """Every unit in order, in this process; a unit's error propagates as it is (a plain loop's behaviour)."""
    check_graph(units)
    results: dict[str, Any] = {}
    where = f"local:{socket.gethostname()}"
    for unit in units:
        start = time.perf_counter()
        results[unit.name] = _call(unit, [results[d] for d in unit.deps])
        on_done(Done(unit, results[unit.name], where, time.perf_counter() - start))
    return results


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError naming the extra that installs it."""
    try:
        import ray  # lazy: an optional extra, and `import ray` costs ~1 s
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _remote_call(fn: Callable[..., Any], kwargs: Mapping[str, Any], *values: Any) -> tuple[Any, tuple[str, float]]:
    """Runs on a Ray worker: ``fn``'s result, and where it ran and for how long."""
    ray = import_ray()
    start = time.perf_counter()
    result = fn(*values, **dict(kwargs))
    where = f"ray:{socket.gethostname()}:{ray.get_runtime_context().get_node_id()[:12]}"
    return result, (where, time.perf_counter() - start)


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


class _Shared:
    """Each non-plain argument object put once into Ray's object store and passed by reference to every unit that
    takes it (a run's shared description is serialised once, not once per unit)."""

    def __init__(self, ray: Any) -> None:
        self.ray, self.refs = ray, {}

    def __call__(self, value: Any) -> Any:
        if _is_plain(value):
            return value
        if id(value) not in self.refs:
            self.refs[id(value)] = (value, self.ray.put(value))  # the value kept alive: its id stays its own
        return self.refs[id(value)][1]


def run_ray(units: Sequence[Unit], on_done: OnDone, config: ExecutorConfig) -> dict[str, Any]:
    """Every unit as a Ray task (dependencies as object references); ``on_done`` in the driver as each finishes."""
    check_graph(units)
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
    remote, shared = ray.remote(num_returns=2)(_remote_call), _Shared(ray)
    refs: dict[str, tuple[Any, Any]] = {}  # unit name → (result ref, where ref)
    pending: dict[Any, Unit] = {}
    try:
        for unit in units:
            res = config.resources_of(unit.kind)
            options = remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=config.max_retries,
                                     retry_exceptions=True, name=unit.name)  # fmt: skip
            values = [shared(a) for a in unit.args] + [refs[d][0] for d in unit.deps]
            refs[unit.name] = options.remote(unit.fn, dict(unit.kwargs), *values)
            pending[refs[unit.name][0]] = unit
        return _collect(ray, pending, refs, on_done, config.max_retries)
    finally:
        if started:
            ray.shutdown()


def _collect(ray: Any, pending: dict[Any, Unit], refs: Mapping[str, tuple[Any, Any]], on_done: OnDone,
             retries: int) -> dict[str, Any]:  # fmt: skip
    """Wait for the tasks in completion order, hand each to ``on_done``; a failed unit stops the run."""
    results: dict[str, Any] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ready[0])
        try:
            result, where = ray.get(ready[0]), ray.get(refs[unit.name][1])
        except Exception as exc:  # noqa: BLE001 - any task error: name the unit and stop
            for ref in pending:
                ray.cancel(ref, force=True)
            raise UnitFailed(f"unit '{unit.name}' failed after {retries + 1} tries: {_root(exc)}") from exc
        results[unit.name] = result
        on_done(Done(unit, result, *where))
    return results


def _root(exc: BaseException) -> str:
    """The original error of a Ray task failure, as one line."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


@contextmanager
def session(config: ExecutorConfig | None) -> Iterator[None]:
    """Ray up for the block when ``config`` asks for it and it is not up yet (then shut down after it), so every
    ``run_units`` of one run shares one Ray session; nothing for the local executor."""
    if config is None or config.kind != "ray":
        yield
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_units(units: Sequence[Unit], on_done: OnDone, config: ExecutorConfig | None = None) -> dict[str, Any]:
    """Run ``units`` (in topological order) with the configured executor; returns every unit's result by name."""
    config = config or ExecutorConfig()
    if config.kind == "ray":
        return run_ray(units, on_done, config)
    return run_local(units, on_done)
