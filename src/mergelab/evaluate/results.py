"""Result rows, mean ± std summaries over seeds, and a tasks × protocols table.

Accuracies are fractions in [0, 1]; tables show percentages. ``summarize`` groups rows by (model, method,
params, protocol, shots) and task, and gives the mean and the population std (ddof = 0, so one seed gives std
0) over seeds. The task average of a group is computed per seed (mean over tasks for each seed that every task
of the group has) and then summarised over those seeds — the paper's "Avg ± std" — or, when no seed is shared
by all tasks, as the mean of the per-task means with an undefined (NaN) std.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import pandas as pd

from mergelab.core.errors import DataError
from mergelab.evaluate.protocols.common import ProtocolOutcome

AVERAGE = "average"
GROUP = ["model", "method", "params", "protocol", "shots"]


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
            model=model,
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


def rows_frame(rows: Iterable[ResultRow | Mapping[str, Any]]) -> pd.DataFrame:
    """The rows (ResultRow or dicts as the results store returns them) as a DataFrame."""
    records = [row.to_dict() if isinstance(row, ResultRow) else dict(row) for row in rows]
    if not records:
        raise DataError("no result rows to summarise; run the benchmark (or pick another split) first")
    frame = pd.DataFrame.from_records(records)
    missing = [c for c in [*GROUP, "task", "seed", "accuracy"] if c not in frame.columns]
    if missing:
        raise DataError(f"result rows lack the column(s) {', '.join(missing)}")
    if "normalized_accuracy" not in frame.columns:
        frame["normalized_accuracy"] = None
    if "transductive" not in frame.columns:
        frame["transductive"] = False
    if "split" in frame.columns and frame["split"].nunique() > 1:
        raise DataError(
            f"result rows mix the splits {sorted(frame['split'].unique())}; summarise one split at a time "
            f"(e.g. ResultStore.rows('test'))"
        )
    frame["params"] = frame["params"].map(params_json)
    frame["normalized_accuracy"] = pd.to_numeric(frame["normalized_accuracy"], errors="coerce")
    return frame


def _stats(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    if values.empty:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=0))


def summarize(rows: Iterable[ResultRow | Mapping[str, Any]]) -> pd.DataFrame:
    """Mean ± std over seeds per (model, method, params, protocol, shots, task) plus a task average per group.

    Columns: model, method, params, protocol, shots, task, n_seeds, mean, std, normalized_mean,
    normalized_std, transductive. The average rows have task = "average".
    """
    frame = rows_frame(rows)
    out: list[dict[str, Any]] = []
    for key, group in frame.groupby(GROUP, sort=True, dropna=False):
        base = dict(zip(GROUP, key, strict=True))
        transductive = bool(group["transductive"].astype(bool).any())
        for task, cells in group.groupby("task", sort=True):
            mean, std = _stats(cells["accuracy"])
            n_mean, n_std = _stats(cells["normalized_accuracy"])
            out.append(
                {
                    **base,
                    "task": task,
                    "n_seeds": int(cells["seed"].nunique()),
                    "mean": mean,
                    "std": std,
                    "normalized_mean": n_mean,
                    "normalized_std": n_std,
                    "transductive": transductive,
                }
            )
        out.append({**base, **_task_average(group), "transductive": transductive})
    return pd.DataFrame.from_records(out)


def _task_average(group: pd.DataFrame) -> dict[str, Any]:
    """Average over tasks: per shared seed, then mean ± std over those seeds (see module doc)."""
    tasks = group["task"].nunique()
    by_seed = group.groupby("seed")
    shared = [seed for seed, cells in by_seed if cells["task"].nunique() == tasks]
    if shared:
        cells = group[group["seed"].isin(shared)]
        per_seed = cells.groupby("seed")[["accuracy", "normalized_accuracy"]].mean()
        normalized_complete = cells.groupby("seed")["normalized_accuracy"].apply(lambda s: s.notna().all())
        mean, std = _stats(per_seed["accuracy"])
        n_mean, n_std = _stats(per_seed["normalized_accuracy"].where(normalized_complete))
        return {
            "task": AVERAGE,
            "n_seeds": len(shared),
            "mean": mean,
            "std": std,
            "normalized_mean": n_mean,
            "normalized_std": n_std,
        }
    task_means = group.groupby("task")[["accuracy", "normalized_accuracy"]].mean()
    n_mean = (
        float(task_means["normalized_accuracy"].mean())
        if task_means["normalized_accuracy"].notna().all()
        else math.nan
    )
    return {
        "task": AVERAGE,
        "n_seeds": 0,
        "mean": float(task_means["accuracy"].mean()),
        "std": math.nan,
        "normalized_mean": n_mean,
        "normalized_std": math.nan,
    }


def format_cell(mean: float, std: float, percent: bool = True) -> str:
    """'71.8 ± 0.2' (percent) — std omitted when NaN or zero for a single seed."""
    if mean is None or math.isnan(mean):
        return "–"
    scale = 100.0 if percent else 1.0
    text = f"{mean * scale:.1f}" if percent else f"{mean:.3f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * scale:.1f}" if percent else f" ± {std:.3f}"
    return text


def pivot_table(
    summary: pd.DataFrame, *, model: str, shots: int | None = None, normalized: bool = False
) -> pd.DataFrame:
    """Tasks (rows, "average" last) × protocols (columns) of ``model`` as 'mean ± std' strings.

    ``shots`` picks the few-shot count (None: each protocol's smallest); a protocol stored with a single shots
    value (the deterministic ones) is shown whatever ``shots`` is, one without the requested count is left
    out. Transductive protocols get a trailing '*' in their column name.
    """
    rows = summary[summary["model"] == model]
    if rows.empty:
        known = ", ".join(sorted(summary["model"].unique()))
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
    table = pd.DataFrame(
        {name: [col.get(t, "–") for t in order] for name, col in columns.items()}, index=order
    )
    table.index.name = "task"
    return table


def render_table(
    summary: pd.DataFrame, *, model: str, shots: int | None = None, normalized: bool = False
) -> Any:
    """The tasks × protocols table of ``model`` as a ``rich.table.Table`` (accuracy in %)."""
    from rich.table import Table

    table_data = pivot_table(summary, model=model, shots=shots, normalized=normalized)
    kind = "normalized accuracy" if normalized else "accuracy"
    caption = (
        "* transductive (uses unlabelled eval inputs)"
        if any(c.endswith("*") for c in table_data.columns)
        else None
    )
    table = Table(
        title=f"{model}: {kind} (%)" + (f", {shots}-shot" if shots is not None else ""), caption=caption
    )
    table.add_column("task")
    for column in table_data.columns:
        table.add_column(str(column), justify="right")
    for task, values in table_data.iterrows():
        table.add_row(str(task), *[str(v) for v in values])
    return table


def table_text(
    summary: pd.DataFrame, *, model: str, shots: int | None = None, normalized: bool = False
) -> str:
    """The same table as plain text (for logs and markdown-free reports)."""
    table_data = pivot_table(summary, model=model, shots=shots, normalized=normalized)
    return table_data.to_string()


class ModelKind(str, Enum):
    """What an evaluated model is: the value stored in a result row's ``model`` column."""

    FINETUNED = "finetuned"  # each task's own expert (the upper bound)
    PRETRAINED = "pretrained"  # the base encoder (the lower bound)
    MERGED = "merged"  # one merged encoder (a method with its chosen parameters)
    MULTITASK = "mtl"  # jointly fine-tuned on every task (a reference, not a merge)
    ENSEMBLE = "ensemble"  # output ensemble of the experts
    NEULIG = "neulig"  # the NeuLig router's ensemble vs merge
