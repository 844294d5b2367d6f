"""What the run chose and ran with: the validation-chosen hyper-parameters, what the data-dependent merges
learned, and the run's facts (configuration, data, few-shot pools, versions, timings) — all as tables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mergelab.bench.report.model import MISSING, Block, Paragraph, Table, percent_cell, row

VALUE_WIDTH = 160  # characters of one learned value shown before it is cut with "…"


def value_text(value: Any, width: int = VALUE_WIDTH) -> str:
    """A parameter or learned value as short plain text: numbers to 4 significant digits, lists and dicts
    inline without JSON quotes, cut with '…' beyond ``width`` characters."""
    text = _plain(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return str(value)


def params_text(params: Mapping[str, Any]) -> str:
    """``scale=0.5, density=0.2`` (sorted keys); 'none' for no parameters."""
    return ", ".join(f"{k}={_plain(params[k])}" for k in sorted(params)) or "none"


def chosen_blocks(chosen: Mapping[str, Any], selection: Mapping[str, Any]) -> tuple[Block, ...]:
    """Per method: the chosen parameters, their validation score, and every candidate's score."""
    if not chosen:
        return (Paragraph("No grid search in this run (every method used its fixed parameters)."),)
    rows = []
    for method, params in chosen.items():
        tried = selection.get(method, [])
        score = next((t["score"] for t in tried if t["params"] == params), None)
        candidates = "; ".join(f"{params_text(t['params'])}: {100 * t['score']:.1f}" for t in tried)
        rows.append(row([method, params_text(params), percent_cell(score), candidates or MISSING]))
    header = ("method", "chosen", "its validation score (%)", "validation score of each candidate (%)")
    return (Table(header, tuple(rows)),)


def learned_name(key: str) -> str:
    """'fisher (num_examples=256)' for the stored key 'fisher {"num_examples": 256}' (other keys unchanged)."""
    name, brace, rest = key.partition(" {")
    try:
        params = json.loads(brace.strip() + rest) if brace else None
    except json.JSONDecodeError:
        return key
    return f"{name} ({params_text(params)})" if isinstance(params, dict) else key


def learned_table(learned: Mapping[str, Mapping[str, Any]]) -> Table:
    """One line per learned quantity (λ_t, coefficients, kept fraction, ...), grouped by data-dependent merge."""
    rows = []
    for name, info in learned.items():
        items = [(key, value) for key, value in info.items() if key != "method"]
        for i, (key, value) in enumerate(items):  # the method named on its first line only
            rows.append(row([learned_name(name) if i == 0 else "", key, value_text(value)]))
    return Table(("method (params)", "learned / chosen", "value"), tuple(rows), label_columns=2)


def config_table(cfg: Mapping[str, Any]) -> Table:
    """The run's protocol settings and how its grid values were selected."""
    settings = [
        ("seeds", cfg.get("seeds")),
        ("shots per class", cfg.get("shots")),
        ("protocols", cfg.get("protocols")),
        ("aligned transforms", cfg.get("transforms")),
        ("grid values chosen on", f"the {cfg.get('select_on')} split by {cfg.get('select_protocol')} (never on test)"),
    ]
    return Table(("setting", "value"), tuple(row([name, _list_text(value)]) for name, value in settings))


def _list_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return MISSING if value is None else str(value)


def data_table(provenance: Mapping[str, Any], pools: Mapping[str, Any]) -> Table | None:
    """Per task: its source, the split sizes used (and asked for), its seed and its few-shot pool."""
    tasks = list(dict.fromkeys([*provenance, *pools]))
    if not tasks:
        return None
    rows = []
    for task in tasks:
        info, pool = provenance.get(task) or {}, pools.get(task)
        sizes, asked = info.get("sizes") or {}, info.get("requested") or {}
        rows.append(row([
            task, str(info.get("source", MISSING)),
            *[_size_text(sizes.get(s), asked.get(s)) for s in ("train", "validation", "test")],
            str(info.get("seed", MISSING)),
            _pool_text(pool),
        ]))  # fmt: skip
    header = ("task", "source", "train", "validation", "test", "seed", "few-shot pool (train examples)")
    note = "Sizes used (asked for, when fewer were available). Each seed draws its k per class from the few-shot pool."
    return Table(header, tuple(rows), note=note)


def _pool_text(pool: Mapping[str, Any] | None) -> str:
    if not pool:
        return MISSING
    return f"{pool['size']} ({pool['per_class']} per class asked, smallest class {pool['smallest_class']})"


def _size_text(size: Any, asked: Any) -> str:
    if size is None:
        return MISSING
    return f"{size}" if asked in (None, size) else f"{size} (of {asked} asked)"


def facts_blocks(meta: Mapping[str, Any]) -> tuple[Block, ...]:
    """The run's facts as tables: configuration, data, versions, timings (those recorded)."""
    blocks: list[Block] = [Paragraph("Configuration:"), config_table(meta.get("config") or {})]
    data = data_table(meta.get("provenance") or {}, meta.get("fewshot_pool") or {})
    if data:
        blocks += [Paragraph("Data:"), data]
    if meta.get("versions"):
        rows = tuple(row([name, str(version)]) for name, version in meta["versions"].items())
        blocks += [Paragraph("Versions:"), Table(("package", "version"), rows)]
    if meta.get("timings"):
        rows = tuple(row([stage, f"{seconds:.0f}"]) for stage, seconds in meta["timings"].items())
        blocks += [Paragraph("Timings:"), Table(("stage", "seconds"), rows)]
    return tuple(blocks)


def units_table(units: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Where a run's units of work ran (``units`` meta of a run on an executor): per host and kind of unit, how
    many, and their seconds there (the units' own time, without scheduling)."""
    if not units:
        return None
    counts: dict[tuple[str, str], list[float]] = {}
    for record in units.values():
        where = ":".join(str(record.get("where", MISSING)).split(":")[:2])  # executor:host (not the Ray node id)
        counts.setdefault((where, str(record.get("kind", MISSING))), []).append(float(record.get("seconds", 0.0)))
    rows = tuple(row([where, kind, str(len(seconds)), f"{sum(seconds):.1f}"])
                 for (where, kind), seconds in sorted(counts.items()))  # fmt: skip
    note = f"{len(units)} units; a unit run again by a resumed run is counted once, where it last ran."
    return Table(("where", "kind of unit", "units", "seconds"), rows, note=note, label_columns=2)
