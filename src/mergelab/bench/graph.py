"""The run as a graph of units (``executor.Unit``) for an executor such as Ray, and the driver that records them.

Units: each expert's fine-tuning (one per task); each model's features on each task (experts, base, multi-task
model, each method's chosen merge); each expert's reference accuracies; each grid candidate's merge and validation
score, and the choice among them; the protocol cells of each (model, task); the NeuLig router; Figure 1's t-SNE.
A unit's dependencies are the units whose results it takes; everything the store already holds is left out, so a
rerun computes only what is missing. The driver (``UnitRecorder``) is the only writer of the store: it commits each
unit's rows as the unit finishes, records what was chosen and learned, where each unit ran, and shows one progress
bar for the whole run. The cells, seeds and keys are the local runner's, so the results are the same.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergelab.bench.baselines import merged_protocols, neulig_subjects, pretrained_features
from mergelab.bench.cells import (
    Subject,
    key_of,
    method_protocols,
    protocol_cells,
    subject_cell_key,
    subject_done,
    tsne_method,
)
from mergelab.bench.config import MethodSpec
from mergelab.bench.context import ALL_SPLITS, RunContext
from mergelab.bench.executor import Done, ExecutorConfig, Unit, UnitKind, run_units
from mergelab.bench.expert_checks import record_expert_checks
from mergelab.bench.methods import is_transductive
from mergelab.bench.pool import Expert, Log, TrainExperts, load_expert
from mergelab.bench.selection import grid_candidates, merge_fingerprint
from mergelab.bench.store import ResultStore
from mergelab.bench.timing import Timings
from mergelab.bench.work import (
    CellsJob,
    FeaturesJob,
    MergeJob,
    NeuLigJob,
    UnitEnv,
    cells_unit,
    choose_unit,
    features_unit,
    finetune_unit,
    merge_unit,
    multitask_unit,
    neulig_unit,
    reference_unit,
    tsne_unit,
)
from mergelab.data.types import TextTask
from mergelab.evaluation.results import ModelKind, params_json
from mergelab.finetune.config import FinetuneConfig
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import atomic_write_text


def unit_env(ctx: RunContext) -> UnitEnv:
    """The run's context as the units read it (plain and picklable: no encoders, no store)."""
    pool = ctx.pool
    return UnitEnv(ctx.cfg, pool.cache_dir.parent, pool.base_path, pool.pooling, dict(pool.tasks), dict(ctx.eval_tasks),
                   {n: e.path for n, e in ctx.experts.items()}, {n: e.fingerprint for n, e in ctx.experts.items()},
                   {n: e.head for n, e in ctx.experts.items()}, ctx.run_key)  # fmt: skip


class GraphBuilder:
    """Adds the units of each part of a run, in the local runner's order (a topological one)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.env, self.units = ctx, unit_env(ctx), []
        self.refs = tuple(f"refs:{n}" for n in ctx.eval_tasks)

    def add(self, name: str, kind: UnitKind, fn: Callable[..., Any], args: tuple[Any, ...], deps: Sequence[str] = ()) -> str:
        self.units.append(Unit(name, kind, fn, args, tuple(deps)))
        return name

    def features(self, model: str, task: str, splits: tuple[str, ...], deps: Sequence[str] = (), source: str = "",
                 fingerprints: tuple[str, ...] = ()) -> str:  # fmt: skip
        job = FeaturesJob(model, task, splits, source, fingerprints)
        label = f"{model}/{source}" if source else model
        return self.add(f"features:{label}:{task}", "features", features_unit, (self.env, job), deps)

    def cells(self, subjects: Sequence[Subject], task: str, protocols: Sequence[str], feats: str,
              splits: tuple[str, ...], after: Sequence[str] = (), **extra: Any) -> None:  # fmt: skip
        """The cells unit of one (subject, task), unless the store holds all of them (one subject known)."""
        cells = tuple(protocol_cells(self.ctx.cfg, protocols))
        keys = {key_of(self.ctx.run_key, s, task, c) for s in subjects for c in cells}
        stored = frozenset(k for k in keys if self.ctx.store.has(k))
        if len(subjects) == 1 and stored == keys:
            return
        job = CellsJob(tuple(subjects), task, cells, stored, splits, **extra)
        name = f"cells:{subjects[0].model.value}/{subjects[0].method}:{task}"
        self.add(name, "cells", cells_unit, (self.env, job), (f"refs:{task}", feats, *after))

    def experts(self) -> None:
        """Each expert's features on its own task and its reference accuracies; on the other tasks' test splits
        too where the ensemble or NeuLig reads them."""
        for n in self.ctx.eval_tasks:
            own = self.features("expert", n, ALL_SPLITS, source=n)
            self.add(f"refs:{n}", "other", reference_unit, (self.env, n), (own,))
        if "ensemble" in self.ctx.cfg.protocols or self.ctx.cfg.neulig is not None:
            for n in self.ctx.eval_tasks:
                for s in self.ctx.experts:
                    if s != n:
                        self.features("expert", n, ("test",), source=s)

    def ensemble(self) -> None:
        others = {n: [f"features:expert/{s}:{n}" for s in self.ctx.experts if s != n] for n in self.ctx.eval_tasks}
        for n in self.ctx.eval_tasks:
            self.cells([Subject(ModelKind.ENSEMBLE, "ensemble")], n, ["ensemble"], f"features:expert/{n}:{n}",
                       ALL_SPLITS, others[n], ensemble=tuple(self.ctx.experts))  # fmt: skip

    def bounds(self) -> None:
        """The base's features (always: the expert checks read them); the experts' and the base's cells."""
        fingerprint = checkpoint_fingerprint(self.ctx.pool.base_path)
        for n in self.ctx.eval_tasks:
            self.features("base", n, ALL_SPLITS, fingerprints=(fingerprint,))
        if not self.ctx.cfg.bounds:
            return
        protocols = [p for p in merged_protocols(self.ctx) if p != "aligned" or self.ctx.cfg.aligned_methods is None]
        for n in self.ctx.eval_tasks:
            self.cells([Subject(ModelKind.FINETUNED, "individual")], n, ["current"], f"features:expert/{n}:{n}", ALL_SPLITS)
            self.cells([Subject(ModelKind.PRETRAINED, "pretrained")], n, protocols, f"features:base:{n}", ALL_SPLITS)

    def multitask(self) -> None:
        subject = Subject(ModelKind.MULTITASK, "mtl")
        if subject_done(self.ctx, subject, ["current"]):
            return
        trained = self.add("finetune:multitask", "finetune", multitask_unit, (self.env,))
        for n in self.ctx.eval_tasks:
            feats = self.features("multitask", n, ("test",), deps=(trained,))
            self.cells([subject], n, ["current"], feats, ("test",), multitask_heads=True)

    def neulig(self) -> None:
        spec = self.ctx.cfg.neulig
        assert spec is not None
        cells = tuple((s, t, subject_cell_key(self.ctx.run_key, s, "current", t, spec.seed, 0))
                      for s in neulig_subjects(spec) for t in self.ctx.pool.tasks)  # fmt: skip
        if all(self.ctx.store.has(key) for _, _, key in cells):
            return
        reads = [f"features:expert/{s}:{n}" for n in self.ctx.eval_tasks for s in self.ctx.experts]
        self.add("neulig", "other", neulig_unit, (self.env, NeuLigJob(cells)), (*self.refs, *reads))

    def method(self, spec: MethodSpec) -> None:
        """A method's grid candidates (merged, scored on validation when there is a choice), the choice, the
        chosen merge's features and cells per task, and Figure 1's data for the t-SNE method."""
        candidates, chosen = grid_candidates(spec), self.ctx.store.get_meta("chosen", {}).get(spec.display)
        if len(candidates) > 1 and chosen is not None:
            candidates = [chosen]  # chosen by an earlier run: not searched again
        subjects = [Subject(ModelKind.MERGED, spec.display, p, transductive=is_transductive(spec.name)) for p in candidates]
        protocols = method_protocols(self.ctx.cfg, spec)
        if len(subjects) == 1 and subject_done(self.ctx, subjects[0], protocols):
            return
        fingerprints = tuple(merge_fingerprint(self.ctx, spec.name, p) for p in candidates)
        score = len(candidates) > 1
        merges = [self.add(f"merge:{spec.display} {params_json(p)}", "merge", merge_unit,
                           (self.env, MergeJob(spec.name, spec.display, p, f, score)), self.refs if score else ())
                  for p, f in zip(candidates, fingerprints, strict=True)]  # fmt: skip
        choice = self.add(f"choose:{spec.display}", "other", choose_unit, (candidates,), merges)
        feats = [self.features("merged", n, ("train", "test"), (choice,), spec.display, fingerprints) for n in self.ctx.eval_tasks]
        for n, f in zip(self.ctx.eval_tasks, feats, strict=True):
            self.cells(subjects, n, protocols, f, ("train", "test"))
        if spec.display == tsne_method(self.ctx.cfg):
            names = tuple(self.ctx.cfg.tsne_tasks or list(self.ctx.eval_tasks)[:2])
            self.add(f"tsne:{spec.display}", "other", tsne_unit, (self.env, spec.display, names), feats)


def build_units(ctx: RunContext) -> list[Unit]:
    """Every unit of the run after the experts, in the local runner's order; what is stored is left out."""
    graph = GraphBuilder(ctx)
    graph.experts()
    if "ensemble" in ctx.cfg.protocols:
        graph.ensemble()
    graph.bounds()
    if ctx.cfg.multitask:
        graph.multitask()
    if ctx.cfg.neulig is not None:
        graph.neulig()
    for spec in ctx.cfg.methods:
        graph.method(spec)
    return graph.units


class UnitRecorder:
    """The driver's side of a run on an executor: each finished unit's rows committed at once (the only writer of
    the store), the choices and learned values recorded, where and how long each unit ran (meta ``units``), and
    one progress bar over every unit of the run. Use as a context manager (the bar stops, ``units`` is saved)."""

    def __init__(self, store: ResultStore, run_dir: Path, log: Log) -> None:
        self.store, self.run_dir, self.log = store, run_dir, log
        self.ran: dict[str, dict[str, Any]] = {}
        self.accuracy: dict[str, float] = {}
        self.bar: Any = None
        self.total = 0

    def __enter__(self) -> UnitRecorder:
        if sys.stderr.isatty():
            self.bar = Progress(TextColumn("units"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True))  # fmt: skip
            self.bar.start()
            self.bar.add_task("units", total=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.ran:
            self.store.set_meta("units", {**self.store.get_meta("units", {}), **self.ran})

    def expect(self, units: Sequence[Unit]) -> None:
        """``units`` join the run's total (the bar's denominator)."""
        self.total += len(units)
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], total=self.total)

    def __call__(self, done: Done) -> None:
        self.ran[done.unit.name] = {"kind": done.unit.kind, "where": done.where, "seconds": round(done.seconds, 4)}
        result = done.result if isinstance(done.result, dict) else {}
        if result.get("rows"):
            self.store.add(result["rows"])  # one transaction per unit: all or nothing
        handler = HANDLERS.get(done.unit.fn)
        if handler is not None:
            handler(self, done.unit, result)
        if "subject" in result and result["rows"]:
            s = result["subject"]
            self.log(f"evaluated {s.model.value}/{s.method} {params_json(s.params)} on {result['task']}")
        elif "log" in result:
            self.log(result["log"])
        if self.bar is not None:
            self.bar.advance(self.bar.task_ids[0])

    def merged(self, unit: Unit, result: Mapping[str, Any]) -> None:
        job: MergeJob = unit.args[1]
        if result.get("learned") is not None:
            learned = self.store.get_meta("learned", {})
            learned[f"{job.display} {params_json(dict(job.params))}"] = result["learned"]
            self.store.set_meta("learned", learned)
        if result.get("score") is not None:
            self.log(f"  {job.display} {params_json(dict(job.params))}: validation score {100 * result['score']:.1f}")

    def chosen(self, unit: Unit, result: Mapping[str, Any]) -> None:
        if result["tried"] is None:
            return
        display = unit.name.removeprefix("choose:")
        self.store.set_meta("selection", {**self.store.get_meta("selection", {}), display: result["tried"]})
        best = result["tried"][result["index"]]["params"]
        self.store.set_meta("chosen", {**self.store.get_meta("chosen", {}), display: best})

    def reference(self, unit: Unit, result: Mapping[str, Any]) -> None:
        self.accuracy[unit.args[1]] = result["test"]

    def tsne(self, unit: Unit, result: Mapping[str, Any]) -> None:
        atomic_write_text(self.run_dir / "tsne.json", json.dumps(result["tsne"]))

    def timings(self) -> dict[str, float]:
        """Seconds per kind of unit, summed over where they ran (the run's ``timings`` on an executor)."""
        out: dict[str, float] = {}
        for record in self.ran.values():
            out[f"units:{record['kind']}"] = out.get(f"units:{record['kind']}", 0.0) + record["seconds"]
        return out


HANDLERS: dict[Callable[..., Any], Callable[[UnitRecorder, Unit, Mapping[str, Any]], None]] = {
    merge_unit: UnitRecorder.merged,
    choose_unit: UnitRecorder.chosen,
    reference_unit: UnitRecorder.reference,
    tsne_unit: UnitRecorder.tsne,
}


def unit_trainer(executor: ExecutorConfig, recorder: UnitRecorder) -> TrainExperts:
    """``pool.train_experts`` as one ``finetune`` unit per task on ``executor`` (each expert cached by content)."""

    def train(experts_dir: Path, base_path: Path, tasks: Mapping[str, TextTask], recipe: FinetuneConfig, threads: int,
              log: Log, timings: Timings, device: str = "auto") -> dict[str, Expert]:  # fmt: skip
        units = [Unit(f"finetune:{n}", "finetune", finetune_unit, (experts_dir, base_path, t, recipe.model_dump(),
                                                                    threads, device)) for n, t in tasks.items()]  # fmt: skip
        recorder.expect(units)
        with timings.timed("experts"):
            paths = run_units(units, recorder, executor)
        experts = {n: load_expert(Path(paths[f"finetune:{n}"]), t) for n, t in tasks.items()}
        for n, e in experts.items():
            log(f"expert '{n}': {e.path}")
        return experts

    return train


def evaluate_graph(ctx: RunContext, executor: ExecutorConfig, recorder: UnitRecorder) -> None:
    """Every unit after the experts on ``executor``, recorded as each finishes; then the expert checks (the
    driver reads the base's features the units cached)."""
    units = build_units(ctx)
    recorder.expect(units)
    run_units(units, recorder, executor)
    accuracy = {n: recorder.accuracy[n] for n in ctx.experts}
    record_expert_checks(ctx.store, ctx.experts, pretrained_features(ctx), accuracy, ctx.log)
