"""The report's input: the store's test rows as ResultRows, their one summary, and the run's metadata."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.bench.report.labels import FEW_SHOT
from mergelab.bench.store import ResultStore
from mergelab.core.errors import MergelabError
from mergelab.evaluation.results import GroupSummary, ModelKind, ResultRow, Stat, Summary, as_rows, summarize

META_KEYS = ("config", "chosen", "selection", "provenance", "versions", "timings", "learned", "fewshot_pool", "units")
RowLike = ResultRow | Mapping[str, Any]


def task_order(rows: Iterable[RowLike]) -> list[str]:
    """Tasks in the order the rows first name them."""
    return list(dict.fromkeys(row.task for row in as_rows(rows)))


def table_shots(rows: Iterable[RowLike], preferred: int = 5) -> int:
    """The shot count the tables show: ``preferred`` when it was run, else the largest run (0: no few-shot rows)."""
    shots = sorted({row.shots for row in as_rows(rows) if row.protocol in FEW_SHOT})
    if not shots:
        return 0
    return preferred if preferred in shots else shots[-1]


def config_methods(config: Mapping[str, Any] | None) -> list[str]:
    """Display names of the configured methods, in config order."""
    return [m.get("label") or m["name"] for m in (config or {}).get("methods", [])]


def method_order(rows: Iterable[ResultRow], preferred: Iterable[str] | None = None) -> list[str]:
    """Merged methods in the config's order (``preferred``; a method split per params by ``distinct_methods`` keeps
    its place), then any others in row order."""
    merged = list(dict.fromkeys(row.method for row in rows if row.model == ModelKind.MERGED.value))
    ordered = [m for name in (preferred or []) for m in merged if m == name or m.startswith(f"{name} {{")]
    return list(dict.fromkeys([*ordered, *merged]))


def distinct_methods(rows: list[ResultRow]) -> list[ResultRow]:
    """The rows with ``method`` made unique per params: a method run with several params becomes one method per
    params, named ``"method {params}"``, so a (model, method, protocol, shots) names one summary group."""
    params: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        params.setdefault((row.model, row.method), set()).add(row.params)
    several = {key for key, values in params.items() if len(values) > 1}
    if not several:
        return rows
    return [
        ResultRow.from_dict({**row.to_dict(), "method": f"{row.method} {row.params}"})
        if (row.model, row.method) in several
        else row
        for row in rows
    ]


@dataclass(frozen=True)
class RunResults:
    """A run's test rows, their summary, its tasks and merged methods in display order, and its metadata."""

    rows: tuple[ResultRow, ...]
    summary: Summary
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    shots: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, rows: Iterable[RowLike], methods: Iterable[str] | None = None, meta: Mapping[str, Any] | None = None
    ) -> RunResults:
        """From result rows (ResultRows or the store's dicts); ``methods``: the config's method order."""
        checked = distinct_methods(as_rows(rows))
        if not checked:
            raise MergelabError("no result rows to report")
        return cls(
            rows=tuple(checked),
            summary=summarize(checked),
            tasks=tuple(task_order(checked)),
            methods=tuple(method_order(checked, methods)),
            shots=table_shots(checked),
            meta=dict(meta or {}),
        )

    def group(self, model: ModelKind | str, method: str, protocol: str, shots: int = 0) -> GroupSummary | None:
        """The summary group of (model, method, protocol, shots), None when not run."""
        return self.summary.find(model, method, protocol, shots)

    def average(self, model: ModelKind | str, method: str, protocol: str, shots: int = 0) -> Stat | None:
        """The task average of (model, method, protocol, shots), None when not run."""
        group = self.group(model, method, protocol, shots)
        return group.average if group else None

    def transductive_method(self, method: str) -> bool:
        """Whether a merged method is itself transductive (its Current rows are: it learned from test inputs)."""
        current = self.group(ModelKind.MERGED, method, "current")
        return bool(current and current.transductive)

    def rows_of(self, model: ModelKind | str | None = None, protocol: str | None = None) -> list[ResultRow]:
        """The rows of one model kind and/or protocol."""
        name = model.value if isinstance(model, ModelKind) else model
        return [
            r for r in self.rows if (name is None or r.model == name) and (protocol is None or r.protocol == protocol)
        ]


def as_results(rows: RunResults | Iterable[RowLike], methods: Iterable[str] | None = None) -> RunResults:
    """``rows`` as RunResults (RunResults are returned unchanged)."""
    return rows if isinstance(rows, RunResults) else RunResults.of(rows, methods)


def load_run(run_dir: Path) -> RunResults:
    """The run folder's test rows and metadata (the experts' record included)."""
    with ResultStore(run_dir / "results.sqlite") as store:
        rows = store.rows("test")
        meta = {key: store.get_meta(key) for key in META_KEYS}
        meta["experts"] = store.get_meta("experts", {})
    if not rows:
        raise MergelabError(f"no results in {run_dir}; run `mergelab bench CONFIG --out {run_dir}` first")
    return RunResults.of(rows, config_methods(meta.get("config")), meta)
