"""Loading what the data-dependent methods read: each fine-tuned classifier with its own task's inputs.

``load_expert_set`` pairs ``finetuned`` (task → HF classifier folder) with ``data`` (the same task names →
``TextTask`` or a data folder / saved DatasetDict) and keeps only the split a method declares it reads;
``expert_set_from_texts`` builds one from plain text lists (tasks named ``task0``, ``task1``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import CPU
from mergelab.core.errors import CheckpointError, DataError
from mergelab.data.tasks import load_task
from mergelab.data.types import TextTask
from mergelab.learned.base import ExpertInput, ExpertSet, Split
from mergelab.models.hf import load_task_model
from mergelab.models.task_model import TaskModel

PathLike = str | os.PathLike[str]


def check_base(base: PathLike) -> Path:
    """The base model folder (an HF folder with a config.json)."""
    path = Path(base)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base model {path} is not a Hugging Face model folder (no config.json)")
    return path


def load_model(path: PathLike, label_names: list[str] | None) -> TaskModel:
    """A fine-tuned classifier in float32 eval mode (its head's labels checked against ``label_names``)."""
    model = load_task_model(path, label_names=label_names)
    model.encoder.float().eval()
    model.head.float().eval()
    return model


def resolve_tasks(finetuned: Mapping[str, PathLike], data: Mapping[str, TextTask | PathLike]) -> dict[str, TextTask]:
    """Each task's ``TextTask`` (data folders loaded), checking that models and data name the same tasks."""
    if not finetuned:
        raise DataError("no fine-tuned models given; pass models={task: checkpoint folder}")
    missing = [t for t in finetuned if t not in data]
    extra = [t for t in data if t not in finetuned]
    if missing or extra:
        raise DataError(f"models and data must name the same tasks; without data: {missing}, without a model: {extra}")
    return {name: data[name] if isinstance(data[name], TextTask) else load_task(name, data[name]) for name in finetuned}


def load_expert_set(
    base: PathLike,
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    split: Split,
    with_labels: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 32,
    seed: int = 0,
    memo: dict[Any, Any] | None = None,
    device: torch.device = CPU,
) -> ExpertSet:
    """Load every fine-tuned model (its head's labels checked against its task) with its task's ``split`` inputs."""
    base_path = check_base(base)
    tasks = resolve_tasks(finetuned, data)
    experts = []
    for name, path in finetuned.items():
        task = tasks[name]
        if split not in task.splits:
            raise DataError(
                f"task '{name}' has no {split} split, which this method reads; add a {split} file "
                f"({split}.csv / .jsonl / .parquet) to its data"
            )
        part = task.splits[split]
        model = load_model(path, task.label_names)
        experts.append(
            ExpertInput(name, model, Path(path), list(part.texts), list(part.labels) if with_labels else None)
        )
    return ExpertSet(base_path, experts, max_length=max_length, batch_size=batch_size, seed=seed, memo=memo,
                     device=device)  # fmt: skip


def expert_set_from_texts(
    base: PathLike,
    expert_paths: Sequence[PathLike],
    texts: Sequence[Sequence[str]],
    labels: Sequence[Sequence[int]] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device = CPU,
) -> ExpertSet:
    """An ``ExpertSet`` from plain text lists (tasks named ``task0``, ``task1``, ...; heads' labels not checked)."""
    base_path = check_base(base)
    if len(texts) != len(expert_paths):
        raise DataError(f"{len(expert_paths)} fine-tuned models but {len(texts)} text lists; give one per model")
    experts = []
    for index, (path, task_texts) in enumerate(zip(expert_paths, texts, strict=True)):
        task_labels = list(labels[index]) if labels is not None else None
        experts.append(ExpertInput(f"task{index}", load_model(path, None), Path(path), list(task_texts), task_labels))
    return ExpertSet(base_path, experts, max_length=max_length, batch_size=batch_size, seed=seed, device=device)
