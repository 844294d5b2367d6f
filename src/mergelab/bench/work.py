"""The benchmark's units of work as plain module-level functions (what a Ray worker runs; ``graph`` builds them).

Every unit takes the run's ``UnitEnv`` (small and picklable: the config, the cache folder, the tasks, the experts'
paths and heads) and a job naming what to do, and returns a small value: a feature fingerprint, a score, result
rows. Large artefacts stay on disk in the content-addressed cache (``--cache-dir``): experts under ``experts/``,
merged weights under ``merges/<merge fingerprint>``, features under ``features/``; a unit writes them there and the
units after it read them by key. No unit writes the results store: the driver commits what a unit returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.baselines import neulig_row, tsne_panel
from mergelab.bench.cells import Cell, References, Subject, cell_row, key_of, own_accuracy, test_context
from mergelab.bench.config import ExperimentConfig
from mergelab.bench.context import ALL_SPLITS, task_features
from mergelab.bench.methods import merge_state
from mergelab.bench.pool import EXPERT_TRAINERS, Task
from mergelab.bench.selection import score_on_validation
from mergelab.bench.timing import Timings, torch_threads
from mergelab.core.device import resolve_device
from mergelab.core.errors import ConfigError
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.results import ResultRow
from mergelab.evaluation.types import TaskFeatures
from mergelab.finetune.experts import get_or_train_multitask, load_multitask
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import save_state_dict
from mergelab.learned.api import neulig_with_data
from mergelab.models.loading import load_encoder, load_task_model

Rows = dict[str, ResultRow]


@dataclass(frozen=True)
class UnitEnv:
    """What every unit reads: the config, the cache root, the base, the tasks (full splits and the few-shot
    ``eval_tasks``), each expert's folder, fingerprint and head, and the run key of every cell key."""

    cfg: ExperimentConfig
    cache_dir: Path
    base_path: Path
    pooling: str
    tasks: Mapping[str, Task]
    eval_tasks: Mapping[str, Task]
    expert_paths: Mapping[str, Path]
    expert_fingerprints: Mapping[str, str]
    heads: Mapping[str, torch.nn.Module]
    run_key: str

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    def cache(self) -> FeatureCache:
        return FeatureCache(self.cache_dir / "features", progress=False, device=self.device)

    def features(self, encoder: Any, fingerprint: str, task: str, splits: tuple[str, ...]) -> TaskFeatures:
        """``RunContext.features`` on a worker: from the cache, computed (by a lazy ``encoder``) when absent."""
        return task_features(self.cache(), self.cfg, self.pooling, self.eval_tasks[task], encoder, fingerprint, splits)

    def cached(self, fingerprint: str, task: str, splits: tuple[str, ...]) -> TaskFeatures:
        """Features an earlier unit wrote (read by key); absent means the cache is not shared with that unit."""

        def absent() -> Any:
            raise ConfigError(f"features of {fingerprint[:20]}… on '{task}' are not in {self.cache_dir / 'features'}; "
                              "on a multi-node Ray cluster --cache-dir must be a shared filesystem every node sees")  # fmt: skip

        return self.features(absent, fingerprint, task, splits)

    def references(self, task: str, accuracy: Mapping[str, Any]) -> References:
        """The references of one task's cells: its expert's features and own accuracies (a ``refs`` unit's)."""
        finetuned = {task: self.cached(self.expert_fingerprints[task], task, ALL_SPLITS)}
        return References(finetuned, {task: accuracy["test"]}, {task: accuracy["validation"]})


def finetune_unit(experts_dir: Path, base_path: Path, task: Task, recipe: Mapping[str, Any], threads: int,
                  device: str) -> str:  # fmt: skip
    """Fine-tune one expert into the cache (or find it there) with the trainer of the task's modality; its folder."""
    path = EXPERT_TRAINERS[task.modality](experts_dir, base_path=base_path, task=task, threads=threads, device=device,
                                          progress=False, **recipe)  # fmt: skip
    return str(path)


def multitask_unit(env: UnitEnv) -> dict[str, Any]:
    """Train the multi-task model into the cache (or find it there); its folder."""
    with torch_threads(env.cfg.threads):
        path = get_or_train_multitask(env.cache_dir / "experts", env.base_path, list(env.tasks.values()),
                                      threads=env.cfg.threads, device=env.device, progress=False,
                                      **env.cfg.finetune.model_dump())  # fmt: skip
    return {"path": str(path)}


def reference_unit(env: UnitEnv, task: str, feats: Mapping[str, Any]) -> dict[str, Any]:
    """An expert's own accuracy (Current Eval with its head) on test and validation, from its cached features."""
    with torch_threads(env.cfg.threads):
        features = env.cached(feats["fingerprint"], task, ALL_SPLITS)
        test, validation = own_accuracy(task, features, env.heads[task], env.device)
    return {"test": test, "validation": validation}


@dataclass(frozen=True)
class MergeJob:
    """One grid candidate of a method: merged into the cache, and scored on validation when ``score``."""

    method: str
    display: str
    params: Mapping[str, Any]
    fingerprint: str
    score: bool


def merged_folder(env: UnitEnv, fingerprint: str) -> Path:
    return env.cache_dir / "merges" / fingerprint


def ensure_merged(env: UnitEnv, method: str, params: Mapping[str, Any], fingerprint: str) -> dict[str, Any] | None:
    """The merged weights in ``merges/<fingerprint>`` (merged and written there if absent); what a data-dependent
    merge learned when it merged here (None otherwise)."""
    folder = merged_folder(env, fingerprint)
    if any(folder.glob("*.safetensors")):
        return None
    state, info = merge_state(method, env.base_path, dict(env.expert_paths), dict(env.tasks), params,
                              max_length=env.cfg.eval_max_length, memo={}, device=env.device)  # fmt: skip
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    try:
        save_state_dict(tensors, folder)
    except Exception:  # noqa: BLE001 - another unit wrote the same merge first: its content is the same
        if not any(folder.glob("*.safetensors")):
            raise
    return info


def merged_encoder(env: UnitEnv, fingerprint: str) -> Callable[[], Any]:
    """A lazy loader of the merged encoder stored under ``fingerprint``."""
    return lambda: load_encoder(merged_folder(env, fingerprint), env.base_path, pooling=env.pooling)


def merge_unit(env: UnitEnv, job: MergeJob, *accuracies: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one grid candidate into the cache; with ``job.score``, its validation score (``accuracies``: every
    task's ``refs`` unit result, in task order)."""
    with torch_threads(env.cfg.threads):
        info = ensure_merged(env, job.method, job.params, job.fingerprint)
        if not job.score:
            return {"score": None, "learned": info}
        refs = References({n: env.cached(env.expert_fingerprints[n], n, ALL_SPLITS) for n in env.eval_tasks},
                          {n: a["test"] for n, a in zip(env.eval_tasks, accuracies, strict=True)},
                          {n: a["validation"] for n, a in zip(env.eval_tasks, accuracies, strict=True)})  # fmt: skip
        encoder = merged_encoder(env, job.fingerprint)
        score = score_on_validation(env.cfg, env.eval_tasks, env.heads, refs, env.device,
                                    lambda name, splits: env.features(encoder, job.fingerprint, name, splits))  # fmt: skip
    return {"score": score, "learned": info}


def choose_unit(candidates: list[dict[str, Any]], *merged: Mapping[str, Any]) -> dict[str, Any]:
    """The best-scoring candidate's index (the first of equals), and every score (None for a single candidate)."""
    if len(candidates) == 1:
        return {"index": 0, "tried": None}
    tried = [{"params": p, "score": m["score"]} for p, m in zip(candidates, merged, strict=True)]
    best = max(range(len(tried)), key=lambda i: tried[i]["score"])
    return {"index": best, "tried": tried}


@dataclass(frozen=True)
class FeaturesJob:
    """One model's features on one task: an expert (``source`` its task), the base, the multi-task model, or a
    merge (``fingerprints`` of the grid candidates, the ``choose`` unit's index picks one)."""

    model: str  # "expert" | "base" | "multitask" | "merged"
    task: str
    splits: tuple[str, ...]
    source: str = ""
    fingerprints: tuple[str, ...] = ()


def features_unit(env: UnitEnv, job: FeaturesJob, *deps: Mapping[str, Any]) -> dict[str, Any]:
    """Compute (or find) one model's features on one task in the cache; their fingerprint (and the choice)."""
    index, path = 0, None
    if job.model == "expert":
        fingerprint = env.expert_fingerprints[job.source]
        task = env.tasks[job.source]
        encoder = lambda: load_task_model(env.expert_paths[job.source], label_names=task.label_names).encoder  # noqa: E731
    elif job.model == "base":
        fingerprint = job.fingerprints[0]
        encoder = lambda: load_encoder(env.base_path, env.base_path, pooling=env.pooling)  # noqa: E731
    elif job.model == "multitask":
        path = deps[0]["path"]
        fingerprint = checkpoint_fingerprint(path)
        encoder = lambda: next(iter(load_multitask(path).values())).encoder  # noqa: E731
    else:
        index = deps[0]["index"]
        fingerprint = job.fingerprints[index]
        encoder = merged_encoder(env, fingerprint)
    with torch_threads(env.cfg.threads):
        env.features(encoder, fingerprint, job.task, job.splits)
    return {"fingerprint": fingerprint, "index": index, "path": path}


@dataclass(frozen=True)
class CellsJob:
    """The cells of one (subject, task) not yet stored: ``subjects`` holds one subject, or a merge's grid
    candidates (its features unit says which was chosen); ``ensemble`` the experts whose test features the
    ensemble protocol averages; ``multitask_heads``: the multi-task model's own heads."""

    subjects: tuple[Subject, ...]
    task: str
    cells: tuple[Cell, ...]
    stored: frozenset[str]
    splits: tuple[str, ...]
    ensemble: tuple[str, ...] = ()
    multitask_heads: bool = False


def cells_unit(env: UnitEnv, job: CellsJob, accuracy: Mapping[str, Any], feats: Mapping[str, Any],
               *_after: Any) -> dict[str, Any]:  # fmt: skip
    """Every cell of one (subject, task) that the store does not hold, as rows keyed by cell key."""
    subject = job.subjects[feats["index"]]
    pending = [(key, cell) for cell in job.cells if (key := key_of(env.run_key, subject, job.task, cell)) not in job.stored]
    if not pending:
        return {"rows": {}, "subject": subject, "task": job.task}
    with torch_threads(env.cfg.threads):
        refs = env.references(job.task, accuracy)
        evaluated = env.cached(feats["fingerprint"], job.task, job.splits)
        head = env.heads[job.task]
        if job.multitask_heads:
            head = load_multitask(feats["path"], {job.task: env.tasks[job.task].label_names})[job.task].head
        members = [refs.finetuned[job.task] if s == job.task else env.cached(env.expert_fingerprints[s], job.task, ("test",))
                   for s in job.ensemble]  # fmt: skip
        context = test_context(job.task, evaluated, head, refs.finetuned[job.task], members, env.device)
        rows = {key: cell_row(env.cfg, Timings(), subject, context, cell, accuracy["test"]) for key, cell in pending}
    return {"rows": rows, "subject": subject, "task": job.task}


@dataclass(frozen=True)
class NeuLigJob:
    """The NeuLig router's cells: (subject, task, cell key) of every row it gives."""

    cells: tuple[tuple[Subject, str, str], ...]


def neulig_unit(env: UnitEnv, job: NeuLigJob, *accuracies: Mapping[str, Any]) -> dict[str, Any]:
    """Train the NeuLig router on the experts (test features read from the cache) and give its rows
    (``accuracies``: every task's ``refs`` unit result, in task order, then the feature units it reads)."""
    spec = env.cfg.neulig
    assert spec is not None
    test = {n: [env.cached(env.expert_fingerprints[s], n, ("test",)).split("test").features for s in env.expert_paths]
            for n in env.tasks}  # fmt: skip
    reference = {n: a["test"] for n, a in zip(env.eval_tasks, accuracies, strict=False)}
    with torch_threads(env.cfg.threads):
        report = neulig_with_data(dict(env.expert_paths), dict(env.tasks), spec, max_length=env.cfg.eval_max_length,
                                  test_features=test, device=env.device)  # fmt: skip
    rows = {key: neulig_row(s, t, spec.seed, report, spec.weights_from[0], reference.get(t)) for s, t, key in job.cells}
    gaps = ", ".join(f"{rule} gap {100 * report.average_of(rule)['gap']:.2f} pt" for rule in spec.weights_from)
    return {"rows": rows, "log": f"evaluated neulig: {gaps}"}


def tsne_unit(env: UnitEnv, method: str, tasks: tuple[str, ...], *feats: Mapping[str, Any]) -> dict[str, Any]:
    """Figure 1's data: fine-tuned vs ``method``'s merged test features on ``tasks`` (``feats``: the merge's
    features units, in task order)."""
    chosen = dict(zip(env.eval_tasks, feats, strict=False))
    panels = [tsne_panel(n, env.cached(env.expert_fingerprints[n], n, ("test",)),
                         env.cached(chosen[n]["fingerprint"], n, ("test",)), 300) for n in tasks if n in chosen]  # fmt: skip
    return {"tsne": {"method": method, "panels": panels}}
