"""The in-memory routes: data-dependent merging and the two data-driven entries that are not one merged model.

* ``merge_with_data(method, base, finetuned, data, out=None, ...)``: run a built ``DataMergeMethod`` (Fisher,
  RegMean, AdaMerging, Consensus with TALL masks) on each model's own task data; one merged encoder, returned as a
  state dict in base layout or written atomically to ``out``. ``mergelab.merge`` (``mergelab.api``) builds the method
  from the registry and calls this; this module knows nothing of method names.
* ``tall_masks_with_data(...)``: one reconstructed encoder per task (TALL masks; not a single merged model).
* ``neulig_with_data(...)``: train the NeuLig router and report ensembling vs merging accuracy per task.

``finetuned`` maps task name → fine-tuned HF classifier folder; ``data`` maps the same names → ``TextTask`` (or a
data folder / saved DatasetDict, loaded with ``load_task``). Each method reads only the split it declares.

``device`` (default ``"auto"``: CUDA, else MPS, else the CPU, so a CPU-only machine computes exactly as before) is
where the models run on the data; merged states, reports and the NeuLig router come back on (or stay on) the CPU.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import DeviceLike, resolve_device
from mergelab.core.errors import DataError
from mergelab.core.sampling import uniform_subset
from mergelab.data.types import TextTask
from mergelab.io.writer import check_target, save_state_dict
from mergelab.learned.base import DataMergeMethod, Split, State
from mergelab.learned.experts import load_expert_set, load_model, resolve_tasks
from mergelab.learned.neulig import (
    NEULIG_SPEC,
    NeuLigOptions,
    NeuLigTask,
    evaluate_neulig,
    expert_features,
    standardized_xi,
    train_router,
)
from mergelab.learned.tall_masks import TALL_MASKS_SPEC, TallMasksParams, tall_masks_reconstruct

PathLike = str | os.PathLike[str]
ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total), as the streaming engine's


def info_as_json(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a method learned or chose (``method.info``) as plain JSON values (tensors as lists)."""
    return json.loads(json.dumps(info, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def merge_with_data(
    method: DataMergeMethod,
    base: PathLike,
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    out: PathLike | None = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 32,
    seed: int = 0,
    force: bool = False,
    memo: dict[Any, Any] | None = None,
    progress: ProgressCallback | None = None,
    device: DeviceLike = "auto",
) -> State | Path:
    """Merge ``finetuned`` with the built data-dependent ``method``, each model with its own task's data.

    Returns the merged encoder state dict (base layout: every float encoder tensor merged, integer buffers from the
    base, heads not included), or writes it atomically to ``out`` (safetensors + the base's config and tokenizer)
    and returns the path. ``method.info`` then holds what it learned or chose (coefficients, λ_t, ...).
    ``memo``: a dict the caller keeps across calls on the same models and data (e.g. a grid over ``scale``); a
    method stores there what does not depend on every parameter (TALL masks), so the next call skips it.
    """
    if out is not None:
        check_target(Path(out), force)
    report = progress or (lambda phase, done, total: None)
    report("loading models and data", 0, 2)
    spec = method.spec
    split: Split = spec.reads  # type: ignore[assignment]  # a data-dependent method reads one of the three splits
    experts = load_expert_set(base, finetuned, data, split, spec.needs_labels, max_length, batch_size, seed, memo,
                              resolve_device(device))  # fmt: skip
    report(f"{spec.name} (in memory)", 1, 2)
    state = method.merge(experts)
    report(f"{spec.name} (in memory)", 2, 2)
    if out is None:
        return state
    return save_state_dict(state, Path(out), config_source=Path(base), force=force)


def tall_masks_with_data(
    base: PathLike,
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, TextTask | PathLike],
    options: TallMasksParams | Mapping[str, Any] | None = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 32,
    device: DeviceLike = "auto",
) -> dict[str, State]:
    """One reconstructed encoder θ₀ + m_t ⊙ τ_MTL per task, λ_t chosen on each task's validation split.

    ``options``: :class:`TallMasksParams` (or its fields as a mapping; ``lambdas``, ``base_merge``, ``density``).
    This is TALL masks' compression / task-localisation use: T models, **not** one merged model.
    """
    p = TALL_MASKS_SPEC.validate(options)
    experts = load_expert_set(base, finetuned, data, "validation", True, max_length, batch_size,
                              device=resolve_device(device))  # fmt: skip
    return tall_masks_reconstruct(experts, p.lambdas, p.base_merge, p.density)  # type: ignore[attr-defined]


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
    options: NeuLigOptions | Mapping[str, Any] | None = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    test_features: Mapping[str, Sequence[torch.Tensor]] | None = None,
    device: DeviceLike = "auto",
) -> NeuLigReport:
    """NeuLig end to end with ``options`` (:class:`NeuLigOptions`, or its fields as a mapping; defaults otherwise):
    features of every expert on every task's train split (``train_examples`` per task at most), the router trained on
    them, then ensembling vs merging accuracy on each task's test split (the first ``test_examples`` items, all by
    default) for each ``weights_from`` rule.

    ``test_features`` (task → each expert's features [N_test, d] of that task's whole test split, in ``finetuned``
    order), when a caller has them cached, replaces the experts' forward passes on the test splits. ``device``: where
    the encoders run (the router trains on the CPU: it is one small Linear on cached features)."""
    p: NeuLigOptions = NEULIG_SPEC.validate(options)  # type: ignore[assignment]
    where = resolve_device(device)
    tasks = resolve_tasks(finetuned, data)
    missing = [name for name, task in tasks.items() if "test" not in task.splits or "train" not in task.splits]
    if missing:
        raise DataError(f"NeuLig trains on each task's train split and evaluates on its test split; {missing} lack one")
    models = {name: load_model(path, tasks[name].label_names) for name, path in finetuned.items()}
    encoders = [m.encoder for m in models.values()]
    states = [{n: t.detach() for n, t in e.model.state_dict().items()} for e in encoders]  # CPU: merged there
    for encoder in encoders:
        encoder.to(where)  # models loaded for this call only
    features, labels = neulig_train_set(tasks.values(), encoders, p, max_length)
    heads = [m.head for m in models.values()]
    router = train_router(features, labels, heads, standardized_xi(states), p.loss, p.steps, p.lr, p.batch_size,
                          p.regulariser_scale, p.seed)  # fmt: skip
    evaluation = {name: _neulig_test_task(name, task, encoders, models[name].head, p.test_examples, max_length,
                                          test_features) for name, task in tasks.items()}  # fmt: skip
    scratch = copy.deepcopy(encoders[0])
    variants = {rule: evaluate_neulig(router, scratch, states, evaluation, rule, p.eval_batch_size, max_length)
                for rule in p.weights_from}  # fmt: skip
    return NeuLigReport(router, variants)


def neulig_train_set(tasks: Iterable[TextTask], encoders: Sequence[Any], options: NeuLigOptions,
                     max_length: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:  # fmt: skip
    """The router's training data: per task, every expert's features of at most ``train_examples`` train items (a
    seeded subset, seed ``options.seed + task index``) and their labels."""
    features, labels = [], []
    for index, task in enumerate(tasks):
        train = task.splits["train"]
        chosen = uniform_subset(len(train), options.train_examples, options.seed + index).tolist()
        features.append(expert_features(encoders, [train.texts[i] for i in chosen], max_length))
        labels.append(torch.tensor([train.labels[i] for i in chosen]))
    return features, labels


def _neulig_test_task(
    name: str,
    task: TextTask,
    encoders: Sequence[Any],
    head: torch.nn.Module,
    test_examples: int | None,
    max_length: int,
    test_features: Mapping[str, Sequence[torch.Tensor]] | None,
) -> NeuLigTask:
    """One task's first ``test_examples`` test items with every expert's features of them (cached or computed)."""
    test = task.splits["test"]
    count = len(test) if test_examples is None else min(test_examples, len(test))
    texts, labels = list(test.texts[:count]), list(test.labels[:count])
    if test_features is None:
        return NeuLigTask(texts, labels, expert_features(encoders, texts, max_length), head)
    given = list(test_features[name]) if name in test_features else []
    if len(given) != len(encoders) or any(f.ndim != 2 or len(f) != len(test) for f in given):
        raise DataError(
            f"test_features['{name}'] must hold one [{len(test)}, d] tensor per expert ({len(encoders)}); "
            f"got {[tuple(f.shape) for f in given]}"
        )
    return NeuLigTask(texts, labels, [f[:count].float() for f in given], head)
