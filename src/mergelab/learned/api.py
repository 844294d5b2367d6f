"""Python entry points for the data-dependent methods.

* ``merge_with_data(method, base, finetuned, data, out=None, ...)``: one merged encoder (Fisher, RegMean,
  AdaMerging, Consensus with TALL masks), returned as a state dict in base layout or written atomically to ``out``.
* ``tall_masks_with_data(...)``: one reconstructed encoder per task (TALL masks; not a single merged model).
* ``neulig_with_data(...)``: train the NeuLig router and report ensembling vs merging accuracy per task.

``finetuned`` maps task name → fine-tuned HF classifier folder; ``data`` maps the same names → ``TextTask`` (or a
data folder / saved DatasetDict, loaded with ``load_task``). Each method reads only the split it declares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.data.tasks import TextTask
from mergelab.learned.base import ExpertInput, ExpertSet, Split, State, sample_indices
from mergelab.learned.neulig import RouterLoss, WeightsFrom
from mergelab.learned.registry import build_data_method
from mergelab.learned.tall_masks import BaseMerge

PathLike = str | os.PathLike[str]


def _check_base(base: PathLike) -> Path:
    path = Path(base)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base model {path} is not a Hugging Face model folder (no config.json)")
    return path


def _load_model(path: PathLike, label_names: list[str] | None) -> Any:
    from mergelab.models.hf import load_task_model

    model = load_task_model(path, label_names=label_names)
    model.encoder.float().eval()
    model.head.float().eval()
    return model


def _resolve_tasks(finetuned: Mapping[str, PathLike], data: Mapping[str, TextTask | PathLike]) -> dict[str, TextTask]:
    from mergelab.data.tasks import load_task

    if not finetuned:
        raise DataError("no fine-tuned models given; pass finetuned={task: checkpoint folder}")
    missing = [t for t in finetuned if t not in data]
    extra = [t for t in data if t not in finetuned]
    if missing or extra:
        raise DataError(
            f"finetuned and data must name the same tasks; without data: {missing}, without a model: {extra}"
        )
    tasks = {}
    for name in finetuned:
        source = data[name]
        tasks[name] = source if isinstance(source, TextTask) else load_task(name, source)
    return tasks


def load_expert_set(
    base: PathLike,
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    split: Split,
    with_labels: bool = False,
    max_length: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    memo: dict[Any, Any] | None = None,
) -> ExpertSet:
    """Load every fine-tuned model (its head's labels checked against its task) with its task's ``split`` inputs."""
    base_path = _check_base(base)
    tasks = _resolve_tasks(finetuned, data)
    experts = []
    for name, path in finetuned.items():
        task = tasks[name]
        if split not in task.splits:
            raise DataError(
                f"task '{name}' has no {split} split, which this method reads; add a {split} file "
                f"({split}.csv / .jsonl / .parquet) to its data"
            )
        part = task.splits[split]
        model = _load_model(path, task.label_names)
        experts.append(
            ExpertInput(name, model, Path(path), list(part.texts), list(part.labels) if with_labels else None)
        )
    return ExpertSet(base_path, experts, max_length=max_length, batch_size=batch_size, seed=seed, memo=memo)


def expert_set_from_texts(
    base: PathLike,
    expert_paths: Sequence[PathLike],
    texts: Sequence[Sequence[str]],
    labels: Sequence[Sequence[int]] | None = None,
    max_length: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> ExpertSet:
    """An ``ExpertSet`` from plain text lists (tasks named ``task0``, ``task1``, ...; heads' labels not checked)."""
    base_path = _check_base(base)
    if len(texts) != len(expert_paths):
        raise DataError(f"{len(expert_paths)} fine-tuned models but {len(texts)} text lists; give one per model")
    experts = []
    for index, (path, task_texts) in enumerate(zip(expert_paths, texts, strict=True)):
        task_labels = list(labels[index]) if labels is not None else None
        experts.append(ExpertInput(f"task{index}", _load_model(path, None), Path(path), list(task_texts), task_labels))
    return ExpertSet(base_path, experts, max_length=max_length, batch_size=batch_size, seed=seed)


def info_as_json(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a method learned or chose (``merge_with_data(info=...)``) as plain JSON values (tensors as lists)."""
    import json

    return json.loads(json.dumps(info, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def merge_with_data(
    method: str,
    base: PathLike,
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    out: PathLike | None = None,
    *,
    max_length: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    force: bool = False,
    info: dict[str, Any] | None = None,
    memo: dict[Any, Any] | None = None,
    **params: Any,
) -> State | Path:
    """Merge ``finetuned`` with the data-dependent ``method`` and its ``params``.

    Returns the merged encoder state dict (base layout: every float encoder tensor merged, integer buffers from the
    base, heads not included), or writes it atomically to ``out`` (safetensors + the base's config and tokenizer)
    and returns the path. ``info``, if given, receives what the method learned or chose (coefficients, λ_t, ...).
    ``memo``: a dict the caller keeps across calls on the same models and data (e.g. a grid over ``scale``); a
    method stores there what does not depend on every parameter (TALL masks), so the next call skips it.
    """
    from mergelab.io.writer import check_target, save_state_dict

    merge_method = build_data_method(method, params)
    merge_method.check_count(len(finetuned))
    if out is not None:
        check_target(Path(out), force)
    experts = load_expert_set(
        base, finetuned, data, merge_method.split, merge_method.needs_labels, max_length, batch_size, seed, memo
    )
    state = merge_method.merge(experts)
    if info is not None:
        info.update(merge_method.info, method=method, split=merge_method.split, transductive=merge_method.transductive)
    if out is None:
        return state
    return save_state_dict(state, Path(out), config_source=Path(base), force=force)


def tall_masks_with_data(
    base: PathLike,
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    *,
    lambdas: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6),
    base_merge: BaseMerge = "task_arithmetic",
    density: float = 0.2,
    max_length: int = 64,
    batch_size: int = 32,
) -> dict[str, State]:
    """One reconstructed encoder θ₀ + m_t ⊙ τ_MTL per task, λ_t chosen on each task's validation split.

    This is TALL masks' compression / task-localisation use: T models, **not** one merged model.
    """
    from mergelab.learned.tall_masks import tall_masks_reconstruct

    if base_merge not in ("task_arithmetic", "ties"):
        raise ConfigError(f"base_merge must be 'task_arithmetic' or 'ties', got {base_merge!r}")

    experts = load_expert_set(base, finetuned, data, "validation", True, max_length, batch_size)
    return tall_masks_reconstruct(experts, lambdas, base_merge, density)


@dataclass
class NeuLigReport:
    """The trained router and, per task, ensembling / merging accuracy on the test split and their gap.

    ``variants`` holds one such table per ``weights_from`` rule evaluated ("first": the reference code's first item
    of each batch; "mean": the batch mean); ``results`` is the first rule's table.
    """

    router: torch.nn.Module
    variants: dict[str, dict[str, dict[str, Any]]]

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        return next(iter(self.variants.values()))

    @property
    def average(self) -> dict[str, float]:
        return self.average_of(next(iter(self.variants)))

    def average_of(self, weights_from: str) -> dict[str, float]:
        table = self.variants[weights_from]
        keys = ("ensemble", "merge", "gap", "top_weight")
        return {k: sum(float(r[k]) for r in table.values()) / len(table) for k in keys}


def neulig_with_data(
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    *,
    loss: RouterLoss = "ce",
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 128,
    train_examples: int | None = None,
    weights_from: WeightsFrom | Sequence[WeightsFrom] = "first",
    eval_batch_size: int = 16,
    test_examples: int | None = None,
    regulariser_scale: float = 100.0,
    max_length: int = 64,
    seed: int = 0,
    test_features: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> NeuLigReport:
    """NeuLig end to end: features of every expert on every task's train split (``train_examples`` per task at
    most), the router trained on them, then ensembling vs merging accuracy on each task's test split (the first
    ``test_examples`` items, all by default) for each ``weights_from`` rule.

    ``test_features`` (task → each expert's features [N_test, d] of that task's whole test split, in ``finetuned``
    order), when a caller has them cached, replaces the experts' forward passes on the test splits."""
    import copy

    from mergelab.learned.neulig import NeuLigTask, evaluate_neulig, expert_features, standardized_xi, train_router

    rules = [weights_from] if isinstance(weights_from, str) else list(weights_from)
    if loss not in ("ce", "entropy"):
        raise ConfigError(f"NeuLig loss must be 'ce' or 'entropy', got {loss!r}")
    if not rules or any(rule not in ("first", "mean") for rule in rules):
        raise ConfigError(f"NeuLig weights_from must be 'first' and/or 'mean', got {weights_from!r}")
    tasks = _resolve_tasks(finetuned, data)
    missing = [name for name, task in tasks.items() if "test" not in task.splits or "train" not in task.splits]
    if missing:
        raise DataError(f"NeuLig trains on each task's train split and evaluates on its test split; {missing} lack one")
    models = {name: _load_model(path, tasks[name].label_names) for name, path in finetuned.items()}
    encoders = [m.encoder for m in models.values()]
    states = [{n: t.detach() for n, t in e.model.state_dict().items()} for e in encoders]
    features, labels = [], []
    for index, task in enumerate(tasks.values()):
        train = task.splits["train"]
        chosen = sample_indices(len(train), train_examples, seed + index)
        features.append(expert_features(encoders, [train.texts[i] for i in chosen], max_length))
        labels.append(torch.tensor([train.labels[i] for i in chosen]))
    heads = [m.head for m in models.values()]
    xi = standardized_xi(states)
    router = train_router(features, labels, heads, xi, loss, steps, lr, batch_size, regulariser_scale, seed)
    evaluation = {}
    for name, task in tasks.items():
        test = task.splits["test"]
        count = len(test) if test_examples is None else min(test_examples, len(test))
        texts, test_labels = list(test.texts[:count]), list(test.labels[:count])
        if test_features is None:
            features_of_test = expert_features(encoders, texts, max_length)
        else:
            given = list(test_features[name]) if name in test_features else []
            if len(given) != len(encoders) or any(f.ndim != 2 or len(f) != len(test) for f in given):
                raise DataError(
                    f"test_features['{name}'] must hold one [{len(test)}, d] tensor per expert ({len(encoders)}); "
                    f"got {[tuple(f.shape) for f in given]}"
                )
            features_of_test = [f[:count].float() for f in given]
        evaluation[name] = NeuLigTask(texts, test_labels, features_of_test, models[name].head)
    scratch = copy.deepcopy(encoders[0])
    variants = {rule: evaluate_neulig(router, scratch, states, evaluation, rule, eval_batch_size, max_length)
                for rule in rules}  # fmt: skip
    return NeuLigReport(router, variants)
