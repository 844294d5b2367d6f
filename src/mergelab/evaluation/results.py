"""Result rows — the one row type — and their one summary: mean ± std over seeds and a task average.

Accuracies are fractions in [0, 1]; tables show percentages. ``summarize`` groups rows by ``SummaryKey`` (model,
method, params, protocol, shots) and task, and gives the mean and the population std (ddof = 0, so one seed
gives std 0) over seeds. The task average of a group is computed per seed (mean over tasks for each seed that
every task of the group has) and then summarised over those seeds — the paper's "Avg ± std". When no seed is
shared by all tasks (a partial run), the average is the mean of the per-task means, its std is undefined (NaN)
and its ``n_seeds`` is 0 (``Stat.no_shared_seed``); reports show it without a std and mark it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from statistics import mean, pstdev
from typing import Any

import pandas as pd

from mergelab.core.errors import DataError
from mergelab.evaluation.protocols.common import ProtocolOutcome

AVERAGE = "average"
GROUP = ["model", "method", "params", "protocol", "shots"]
REQUIRED = ("model", "method", "protocol", "task", "seed", "shots", "accuracy")


class ModelKind(str, Enum):
    """What an evaluated model is: the value stored in a result row's ``model`` column."""

    FINETUNED = "finetuned"  # each task's own expert (the upper bound)
    PRETRAINED = "pretrained"  # the base encoder (the lower bound)
    MERGED = "merged"  # one merged encoder (a method with its chosen parameters)
    MULTITASK = "mtl"  # jointly fine-tuned on every task (a reference, not a merge)
    ENSEMBLE = "ensemble"  # output ensemble of the experts
    NEULIG = "neulig"  # the NeuLig router's ensemble vs merge


def model_name(model: ModelKind | str) -> str:
    """The stored ``model`` text of a kind (a plain string is returned unchanged)."""
    return model.value if isinstance(model, ModelKind) else str(model)


def params_json(params: Mapping[str, Any] | str | None) -> str:
    """Canonical JSON text of a parameter dict (sorted keys); a string is returned unchanged."""
    if isinstance(params, str):
        return params
    return json.dumps(dict(params or {}), sort_keys=True, default=str)


def normalized(accuracy: float, finetuned_accuracy: float | None) -> float | None:
    """``accuracy / finetuned_accuracy``, or None when the fine-tuned accuracy is unknown or zero."""
    if finetuned_accuracy is None or finetuned_accuracy <= 0 or math.isnan(finetuned_accuracy):
        return None
    return accuracy / finetuned_accuracy


def protocol_label(name: str, options: Mapping[str, Any] | None = None) -> str:
    """Stored/display name of a protocol run with options, as the runner writes it: ``aligned:orthogonal`` for
    one option, ``name:k=v,k=v`` (sorted keys) for several, ``name`` for none."""
    if not options:
        return name
    if len(options) == 1:
        return f"{name}:{next(iter(options.values()))}"
    return f"{name}:{','.join(f'{k}={options[k]}' for k in sorted(options))}"


RATE_MARK = "@"  # a sampling-rate cell's stored protocol name: ``ft_classifier@1%``, ``ft_classifier:converged@0.5%``


def rate_label(rate: float) -> str:
    """A sampling rate (a fraction of the test inputs) as a percentage: 0.005 → '0.5%', 0.01 → '1%'."""
    return f"{100 * float(rate):.6g}%"


def rate_protocol(stored: str, rate: float) -> str:
    """The stored protocol name of ``stored`` run at sampling rate ``rate`` (``ft_classifier@1%``)."""
    return f"{stored}{RATE_MARK}{rate_label(rate)}"


def split_rate(protocol: str) -> tuple[str, str | None]:
    """(stored name without the rate, the rate's label or None) of a stored protocol name."""
    base, mark, label = protocol.partition(RATE_MARK)
    return (base, label) if mark else (protocol, None)


@dataclass(frozen=True)
class SummaryKey:
    """One summary group: a model (kind, method, params) under one protocol at one shot count."""

    model: str
    method: str
    protocol: str
    shots: int
    params: str = "{}"


@dataclass(frozen=True)
class ResultRow:
    """One evaluated cell (model/method + params, protocol, task, seed, shots)."""

    model: str
    method: str
    params: str
    protocol: str
    task: str
    seed: int
    shots: int
    accuracy: float
    normalized_accuracy: float | None = None
    transductive: bool = False
    split: str = "test"
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary_key(self) -> SummaryKey:
        """The summary group this row belongs to."""
        return SummaryKey(self.model, self.method, self.protocol, self.shots, self.params)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultRow:
        """A row from a dict as ``to_dict`` or the results store gives it (its ``key`` and other unknown keys are
        ignored; ``params`` and ``extras`` may be dicts or JSON text; ``params`` defaults to ``{}``)."""
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise DataError(f"result rows lack the column(s) {', '.join(missing)}")
        extras = data.get("extras") or {}
        norm = data.get("normalized_accuracy")
        return cls(
            model=model_name(data["model"]),
            method=str(data["method"]),
            params=params_json(data.get("params")),
            protocol=str(data["protocol"]),
            task=str(data["task"]),
            seed=int(data["seed"]),
            shots=int(data["shots"]),
            accuracy=float(data["accuracy"]),
            normalized_accuracy=None if norm is None else float(norm),
            transductive=bool(data.get("transductive", False)),
            split=str(data.get("split") or "test"),
            extras=json.loads(extras) if isinstance(extras, str) else dict(extras),
        )

    @classmethod
    def from_outcome(
        cls,
        outcome: ProtocolOutcome,
        *,
        model: str,
        method: str,
        params: Mapping[str, Any] | str | None,
        protocol: str,
        task: str,
        seed: int,
        shots: int,
        finetuned_accuracy: float | None = None,
        split: str = "test",
    ) -> ResultRow:
        """A row from a ``ProtocolOutcome`` (normalised by ``finetuned_accuracy`` when known)."""
        return cls(
            model=model_name(model),
            method=method,
            params=params_json(params),
            protocol=protocol,
            task=task,
            seed=int(seed),
            shots=int(shots),
            accuracy=float(outcome.accuracy),
            normalized_accuracy=normalized(float(outcome.accuracy), finetuned_accuracy),
            transductive=bool(outcome.transductive),
            split=split,
            extras=dict(outcome.extras),
        )


def as_rows(rows: Iterable[ResultRow | Mapping[str, Any]]) -> list[ResultRow]:
    """ResultRows from ResultRows or dicts (as the results store returns them)."""
    return [row if isinstance(row, ResultRow) else ResultRow.from_dict(row) for row in rows]


@dataclass(frozen=True)
class Stat:
    """Mean ± population std over seeds of one (group, task), or of a group's task average.

    ``n_seeds`` is the number of seeds summarised; 0 for a task average without a seed shared by every task
    (then ``std`` is NaN: see the module doc). Normalised values are NaN when no row carries them.
    """

    mean: float
    std: float
    n_seeds: int
    normalized_mean: float = math.nan
    normalized_std: float = math.nan

    @property
    def no_shared_seed(self) -> bool:
        """A task average taken over per-task means because no seed is shared by every task."""
        return self.n_seeds == 0

    def text(self) -> str:
        """'80.6 ± 2.1' (percent); the std only when more than one seed was summarised."""
        if self.n_seeds > 1:
            return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"
        return f"{100 * self.mean:.1f}"

    def percent(self) -> float:
        """The mean in percent, rounded as ``text`` shows it (ties in a table compare equal)."""
        return round(100 * self.mean, 1)


@dataclass(frozen=True)
class GroupSummary:
    """Every task of one ``SummaryKey``: a Stat per task (sorted by name) and their average."""

    key: SummaryKey
    tasks: Mapping[str, Stat]
    average: Stat
    transductive: bool  # any of the group's rows is

    def get(self, task: str) -> Stat | None:
        """The Stat of ``task``, or the average for ``"average"``; None when the task was not run."""
        return self.average if task == AVERAGE else self.tasks.get(task)


class Summary(Mapping[SummaryKey, GroupSummary]):
    """``summarize``'s result: SummaryKey → GroupSummary (sorted by model, method, params, protocol, shots)."""

    def __init__(self, groups: Mapping[SummaryKey, GroupSummary]) -> None:
        self._groups = dict(groups)

    def __getitem__(self, key: SummaryKey) -> GroupSummary:
        return self._groups[key]

    def __iter__(self) -> Iterator[SummaryKey]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def select(
        self,
        *,
        model: ModelKind | str | None = None,
        method: str | None = None,
        protocol: str | None = None,
        shots: int | None = None,
    ) -> list[GroupSummary]:
        """The groups matching every given field, in summary order."""
        wanted = {
            "model": None if model is None else model_name(model),
            "method": method,
            "protocol": protocol,
            "shots": shots,
        }
        return [g for k, g in self._groups.items() if all(v is None or getattr(k, f) == v for f, v in wanted.items())]

    def find(self, model: ModelKind | str, method: str, protocol: str, shots: int = 0) -> GroupSummary | None:
        """The one group of (model, method, protocol, shots), whatever its params; None when not run."""
        found = self.select(model=model, method=method, protocol=protocol, shots=shots)
        if len(found) > 1:
            params = ", ".join(g.key.params for g in found)
            raise DataError(
                f"{model_name(model)} {method} {protocol} ({shots} shots) was run with several params "
                f"({params}); look it up by its SummaryKey"
            )
        return found[0] if found else None

    def frame(self) -> pd.DataFrame:
        """One line per (group, task) plus the group's "average" line. Columns: model, method, params, protocol,
        shots, task, n_seeds, mean, std, normalized_mean, normalized_std, transductive."""
        records = []
        for key, group in self._groups.items():
            base = {name: getattr(key, name) for name in GROUP}
            for task, stat in [*group.tasks.items(), (AVERAGE, group.average)]:
                records.append({**base, "task": task, **asdict(stat), "transductive": group.transductive})
        return pd.DataFrame.from_records(records)


def summarize(rows: Iterable[ResultRow | Mapping[str, Any]]) -> Summary:
    """THE summary of result rows (ResultRows or the store's dicts) of one split: mean ± std over seeds per
    (SummaryKey, task) and a task average per key (see the module doc for the no-shared-seed case)."""
    checked = as_rows(rows)
    if not checked:
        raise DataError("no result rows to summarise; run the benchmark (or pick another split) first")
    splits = sorted({row.split for row in checked})
    if len(splits) > 1:
        raise DataError(
            f"result rows mix the splits {splits}; summarise one split at a time (e.g. ResultStore.rows('test'))"
        )
    cells: dict[SummaryKey, dict[str, dict[int, ResultRow]]] = defaultdict(lambda: defaultdict(dict))
    for row in checked:
        seeds = cells[row.summary_key][row.task]
        if row.seed in seeds:
            raise DataError(
                f"result rows repeat the cell {row.summary_key} task {row.task} seed {row.seed}; "
                "each cell must be stored once"
            )
        seeds[row.seed] = row
    order = sorted(cells, key=lambda k: (k.model, k.method, k.params, k.protocol, k.shots))
    return Summary({key: _group(key, cells[key]) for key in order})


def _group(key: SummaryKey, by_task: Mapping[str, Mapping[int, ResultRow]]) -> GroupSummary:
    tasks = {task: _stat(list(by_task[task].values())) for task in sorted(by_task)}
    transductive = any(row.transductive for seeds in by_task.values() for row in seeds.values())
    return GroupSummary(key, tasks, _task_average(by_task, tasks), transductive)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return mean(values), pstdev(values) if len(values) > 1 else 0.0


def _stat(rows: list[ResultRow]) -> Stat:
    """Mean ± std over the seeds of one (group, task)."""
    acc = _mean_std([row.accuracy for row in rows])
    norm = _mean_std([row.normalized_accuracy for row in rows if row.normalized_accuracy is not None])
    return Stat(*acc, len(rows), *norm)


def _task_average(by_task: Mapping[str, Mapping[int, ResultRow]], tasks: Mapping[str, Stat]) -> Stat:
    """Average over tasks: per shared seed, then mean ± std over those seeds (see the module doc)."""
    shared = sorted(set.intersection(*(set(seeds) for seeds in by_task.values())))
    if not shared:
        norms = [stat.normalized_mean for stat in tasks.values()]
        n_mean = mean(norms) if not any(math.isnan(v) for v in norms) else math.nan
        return Stat(mean(stat.mean for stat in tasks.values()), math.nan, 0, n_mean, math.nan)
    per_seed = [[by_task[task][seed] for task in by_task] for seed in shared]
    acc = _mean_std([mean(row.accuracy for row in rows) for rows in per_seed])
    complete = [rows for rows in per_seed if all(row.normalized_accuracy is not None for row in rows)]
    norm = _mean_std([mean(row.normalized_accuracy for row in rows) for rows in complete])  # type: ignore[misc]
    return Stat(*acc, len(shared), *norm)


def format_cell(mean: float, std: float, percent: bool = True) -> str:
    """'71.8 ± 0.2' (percent) — std omitted when NaN or zero for a single seed."""
    if mean is None or math.isnan(mean):
        return "–"
    scale = 100.0 if percent else 1.0
    text = f"{mean * scale:.1f}" if percent else f"{mean:.3f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * scale:.1f}" if percent else f" ± {std:.3f}"
    return text


def pivot_table(summary: Summary, *, model: str, shots: int | None = None, normalized: bool = False) -> pd.DataFrame:
    """Tasks (rows, "average" last) × protocols (columns) of ``model`` as 'mean ± std' strings.

    ``shots`` picks the few-shot count (None: each protocol's smallest); a protocol stored with a single shots
    value (the deterministic ones) is shown whatever ``shots`` is, one without the requested count is left
    out. Transductive protocols get a trailing '*' in their column name.
    """
    frame = summary.frame()
    rows = frame[frame["model"] == model]
    if rows.empty:
        known = ", ".join(sorted(frame["model"].unique()))
        raise DataError(f"no results for model '{model}'; models in the summary: {known}")
    mean_col, std_col = ("normalized_mean", "normalized_std") if normalized else ("mean", "std")
    columns: dict[str, dict[str, str]] = {}
    for protocol, cells in rows.groupby("protocol", sort=False):
        available = sorted(cells["shots"].unique())
        if shots is not None and shots in available:
            cells = cells[cells["shots"] == shots]
        elif len(available) == 1:
            pass
        elif shots is None:
            cells = cells[cells["shots"] == available[0]]
        else:
            continue
        name = f"{protocol}*" if bool(cells["transductive"].any()) else str(protocol)
        columns[name] = {
            str(r.task): format_cell(getattr(r, mean_col), getattr(r, std_col)) for r in cells.itertuples()
        }
    tasks = sorted({t for col in columns.values() for t in col if t != AVERAGE})
    order = [*tasks, AVERAGE]
    table = pd.DataFrame({name: [col.get(t, "–") for t in order] for name, col in columns.items()}, index=order)
    table.index.name = "task"
    return table


def render_table(summary: Summary, *, model: str, shots: int | None = None, normalized: bool = False) -> Any:
    """The tasks × protocols table of ``model`` as a ``rich.table.Table`` (accuracy in %)."""
    from rich.table import Table

    table_data = pivot_table(summary, model=model, shots=shots, normalized=normalized)
    kind = "normalized accuracy" if normalized else "accuracy"
    caption = (
        "* transductive (uses unlabelled eval inputs)" if any(c.endswith("*") for c in table_data.columns) else None
    )
    table = Table(title=f"{model}: {kind} (%)" + (f", {shots}-shot" if shots is not None else ""), caption=caption)
    table.add_column("task")
    for column in table_data.columns:
        table.add_column(str(column), justify="right")
    for task, values in table_data.iterrows():
        table.add_row(str(task), *[str(v) for v in values])
    return table


def table_text(summary: Summary, *, model: str, shots: int | None = None, normalized: bool = False) -> str:
    """The same table as plain text (for logs and markdown-free reports)."""
    table_data = pivot_table(summary, model=model, shots=shots, normalized=normalized)
    return table_data.to_string()
