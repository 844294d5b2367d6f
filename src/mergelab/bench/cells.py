"""Cells and their evaluation: a cell is (subject, protocol, task, seed, shots), keyed by what determines it.

A subject is an evaluated model (a merge with its parameters, the experts, the base, ...). ``evaluate_subject``
runs every cell of one subject that the store does not hold yet, one transaction per (subject, task), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mergelab.bench.config import ExperimentConfig, MethodSpec
from mergelab.bench.context import RunContext
from mergelab.bench.pool import Expert
from mergelab.bench.store import cell_key
from mergelab.bench.timing import Timings, torch_threads
from mergelab.data.types import TextTask
from mergelab.evaluation.api import expand_cells
from mergelab.evaluation.devices import on_device
from mergelab.evaluation.protocols.common import ProtocolContext, ProtocolOutcome
from mergelab.evaluation.protocols.registry import get_protocol, run_protocol
from mergelab.evaluation.results import ModelKind, ResultRow, params_json
from mergelab.evaluation.types import TaskFeatures

Cell = tuple[str, str, dict[str, Any], int, int]  # (stored protocol name, protocol, options, seed, shots)


@dataclass(frozen=True)
class Subject:
    """What is being evaluated: a row family in the results (merged with params, fine-tuned, pretrained, ...)."""

    model: ModelKind
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    transductive: bool = False  # the merge itself learned from unlabelled test inputs (e.g. AdaMerging)


@dataclass(frozen=True)
class References:
    """What every subject is measured against: each expert's features, and its own accuracy (Current Eval with
    its head) on test (the normaliser) and validation (the grid search's)."""

    finetuned: Mapping[str, TaskFeatures]
    test_accuracy: Mapping[str, float]
    validation_accuracy: Mapping[str, float]


def run_key(experts: Mapping[str, Expert], eval_tasks: Mapping[str, TextTask]) -> str:
    """What every cell of a run shares: the experts' content and the evaluated data."""
    parts = sorted((n, e.fingerprint, eval_tasks[n].content_hash()) for n, e in experts.items())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def subject_cell_key(run: str, subject: Subject, protocol: str, task: str, seed: int, shots: int) -> str:
    """The store key of one cell: everything that determines its value (the run key covers experts and data)."""
    return cell_key(run=run, model=subject.model.value, method=subject.method, params=subject.params,
                    protocol=protocol, task=task, seed=seed, shots=shots, split="test")  # fmt: skip


def key_of(run: str, subject: Subject, task: str, cell: Cell) -> str:
    """The store key of ``cell`` of ``subject`` on ``task``."""
    stored, _, _, seed, shots = cell
    return subject_cell_key(run, subject, stored, task, seed, shots)


def protocol_cells(cfg: ExperimentConfig, protocols: Sequence[str]) -> list[Cell]:
    """Every cell of one (subject, task), with each protocol's configured options."""
    return [
        (stored, protocol, {**cfg.protocol_options.get(protocol, {}), **options}, seed, shots)
        for stored, protocol, options, seed, shots in expand_cells(protocols, cfg.shots, cfg.seeds, cfg.transforms, cfg.protocol_options,
                                                                   sampling_rates=cfg.sampling_rates or ())
    ]  # fmt: skip


def subject_done(ctx: RunContext, subject: Subject, protocols: Sequence[str]) -> bool:
    """Whether the store holds every cell of ``subject`` on every task."""
    cells = protocol_cells(ctx.cfg, protocols)
    return all(ctx.store.has(key_of(ctx.run_key, subject, task, cell)) for task in ctx.eval_tasks for cell in cells)


def subject_row(subject: Subject, task: str, cell: Cell, outcome: ProtocolOutcome, reference: float | None) -> ResultRow:
    """The result row of one cell; it is transductive if the outcome, the protocol or the subject is."""
    stored, protocol, _, seed, shots = cell
    row = ResultRow.from_outcome(outcome, model=subject.model.value, method=subject.method, params=subject.params,
                                 protocol=stored, task=task, seed=seed, shots=shots, finetuned_accuracy=reference)  # fmt: skip
    transductive = row.transductive or get_protocol(protocol).transductive or subject.transductive
    return replace(row, transductive=transductive)


def evaluate_subject(ctx: RunContext, subject: Subject, features: Mapping[str, TaskFeatures],
                     protocols: Sequence[str], refs: References, *, heads: Mapping[str, torch.nn.Module] | None = None,
                     ensemble: Mapping[str, list[TaskFeatures]] | None = None) -> None:  # fmt: skip
    """Run every (protocol, seed, shots) cell of ``subject`` on every task, skipping stored cells.

    ``heads`` replaces the experts' heads (the multi-task model brings its own); ``ensemble`` gives, per task,
    every expert's features (the ensemble protocol)."""
    cells = protocol_cells(ctx.cfg, protocols)
    for task, feats in features.items():
        keyed = [(key_of(ctx.run_key, subject, task, cell), cell) for cell in cells]
        pending = [(key, cell) for key, cell in keyed if not ctx.store.has(key)]
        if not pending:
            continue
        context = test_context(task, feats, (heads or {}).get(task, ctx.experts[task].head), refs.finetuned[task],
                               (ensemble or {}).get(task, []), ctx.device)  # fmt: skip
        rows = {key: run_cell(ctx, subject, context, cell, refs.test_accuracy.get(task)) for key, cell in pending}
        ctx.store.add(rows)  # one transaction per (subject, task): all or nothing
    ctx.log(f"evaluated {subject.model.value}/{subject.method} {params_json(subject.params)}")


def test_context(task: str, feats: TaskFeatures, head: torch.nn.Module, finetuned: TaskFeatures,
                 ensemble: list[TaskFeatures], device: torch.device) -> ProtocolContext:  # fmt: skip
    """What every protocol cell of one (subject, task) reads, on ``device`` (the CPU: the very same context)."""
    context = ProtocolContext(task=task, evaluated=feats, head=head, finetuned=finetuned, ensemble_features=ensemble,
                              eval_split="test")  # fmt: skip
    return on_device(context, device)


def run_cell(ctx: RunContext, subject: Subject, context: ProtocolContext, cell: Cell,
             reference: float | None) -> ResultRow:  # fmt: skip
    """One protocol run of the run's cell (see :func:`cell_row`)."""
    return cell_row(ctx.cfg, ctx.timings, subject, context, cell, reference)


def cell_row(cfg: ExperimentConfig, timings: Timings, subject: Subject, context: ProtocolContext, cell: Cell,
             reference: float | None) -> ResultRow:  # fmt: skip
    """One protocol run (dense protocols on the run's threads, the others on ``protocol_threads``) as a row."""
    _, protocol, options, seed, shots = cell
    threads = cfg.threads if get_protocol(protocol).dense else cfg.protocol_threads
    with timings.timed(f"protocol:{protocol}"), torch_threads(threads):
        outcome = run_protocol(protocol, context, seed=seed, shots=shots, **options)
    return subject_row(subject, context.task, cell, outcome, reference)


def own_accuracy(name: str, feats: TaskFeatures, head: torch.nn.Module, device: torch.device) -> tuple[float, float | None]:
    """An expert's own accuracy (Current Eval with its own head) on test and, where present, validation."""
    test = run_protocol("current", on_device(ProtocolContext(name, feats, head, feats), device)).accuracy
    if "validation" not in feats.splits:
        return test, None
    context = on_device(ProtocolContext(name, feats, head, feats, eval_split="validation"), device)
    return test, run_protocol("current", context).accuracy


def finetuned_references(ctx: RunContext, finetuned: Mapping[str, TaskFeatures]) -> References:
    """Each expert's own accuracy (Current Eval with its own head) on test and, where present, validation."""
    test, validation = {}, {}
    for name, feats in finetuned.items():
        test[name], val = own_accuracy(name, feats, ctx.experts[name].head, ctx.device)
        if val is not None:
            validation[name] = val
    return References(finetuned, test, validation)


def method_protocols(cfg: ExperimentConfig, spec: MethodSpec) -> list[str]:
    """A merge's protocols: all but the ensemble, the aligned ones only for ``aligned_methods`` (if listed)."""
    return [p for p in cfg.protocols if p != "ensemble"
            and (p != "aligned" or cfg.aligned_methods is None or spec.display in cfg.aligned_methods)]  # fmt: skip


def tsne_method(cfg: ExperimentConfig) -> str | None:
    """The method whose merged features Figure 1 shows (the first one by default)."""
    return cfg.tsne_method or (cfg.methods[0].display if cfg.methods else None)
