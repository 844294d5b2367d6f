"""Are the experts experts? Given ones are checked against the base; every one is scored against its bars.

Experts a config gives (``experts:``) must be fine-tunes of the base: the same model type, every floating-point
base tensor present with the base's shape (checked on headers, no weights read), and not a copy of the base (the
first differing tensor ends the comparison). Their labels are checked against the task's when they are loaded.

An expert that does not beat the linear probe trained on the same train examples with the encoder frozen (or the
majority-class rate) is under-trained, and its "fine-tuned upper bound" is not one; the run flags it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.store import ResultStore
from mergelab.core.errors import CheckpointError
from mergelab.evaluation.protocols.common import accuracy
from mergelab.finetune.experts import TRAINING_LOG, load_probe
from mergelab.io.alignment import AlignedReader, align
from mergelab.io.reader import CheckpointReader, open_checkpoint, read_config
from mergelab.models.task_model import head_output_count


def weight_names(reader: CheckpointReader) -> list[str]:
    """The base's floating-point tensors: what a merge reads from every expert (integer buffers such as
    ``position_ids`` are not weights)."""
    return [name for name in reader.keys() if reader.dtype(name).is_floating_point]


def check_architecture(task: str, expert: CheckpointReader, base: CheckpointReader) -> AlignedReader:
    """The expert in the base's layout; another model type, a missing base tensor or another shape is an error."""
    where = f"expert '{task}' ({expert.path})"
    base_type, expert_type = read_config(base).get("model_type"), read_config(expert).get("model_type")
    if base_type and expert_type and base_type != expert_type:
        raise CheckpointError(f"{where} is a {expert_type} model but the base {base.path} is {base_type}; "
                              "give experts fine-tuned from the base")  # fmt: skip
    aligned = align(base, expert)
    names = weight_names(base)
    missing = [name for name in names if name not in aligned]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} of the base's {len(names)} tensors ({missing[:3]}): "
                              f"it is not a fine-tune of the base {base.path}")  # fmt: skip
    for name in names:
        if tuple(aligned.shape(name)) != tuple(base.shape(name)):
            shapes = f"{list(aligned.shape(name))} but the base's has {list(base.shape(name))}"
            raise CheckpointError(f"{where}: tensor '{name}' has shape {shapes}; it is not a fine-tune of the base "
                                  f"{base.path}")  # fmt: skip
    return aligned


def check_differs_from_base(task: str, expert: AlignedReader, base: CheckpointReader) -> None:
    """An expert whose every base tensor equals the base's (in the expert's dtype) is a copy of the base."""
    for name in weight_names(base):
        theirs = expert.get(name)
        if not torch.equal(theirs, base.get(name).to(theirs.dtype)):
            return
    raise CheckpointError(f"expert '{task}' ({expert.path}) has exactly the base's weights: it is a copy of the base, "
                          "not a fine-tuned expert; give the fine-tuned checkpoint")  # fmt: skip


def check_given_experts(paths: Mapping[str, Path], base_path: Path) -> None:
    """Every given expert is a fine-tune of the base: same architecture and tensors, different weights."""
    base = open_checkpoint(base_path)
    for task, path in paths.items():
        check_differs_from_base(task, check_architecture(task, open_checkpoint(path), base), base)


def majority_rate(labels: torch.Tensor) -> float:
    """The share of the most frequent class (the accuracy of always predicting it), exactly ``count / n``."""
    return int(torch.bincount(labels.long()).max()) / len(labels)


def expert_verdict(name: str, expert_accuracy: float, probe_accuracy: float | None, majority: float,
                   training: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One expert's row: its test accuracy, the bars it must beat, its training curve, and the flags."""
    return {
        "test_accuracy": expert_accuracy,
        "probe_accuracy": probe_accuracy,
        "majority_rate": majority,
        "losses": list(training.get("losses", [])),
        "head_shift": training.get("head_shift"),
        "head_init": training.get("head_init"),
        "probe_C": (training.get("probe") or {}).get("C"),
        "steps": training.get("steps"),
        "below_probe": probe_accuracy is not None and not expert_accuracy > probe_accuracy,
        "below_majority": not expert_accuracy > majority,
        "recipe": training.get("config", {}),
        "task": name,
    }


def read_training_log(folder: Path) -> dict[str, Any]:
    """An expert folder's ``mergelab_training.json`` ({} for experts trained elsewhere)."""
    file = Path(folder) / TRAINING_LOG
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}


def check_experts(experts: Mapping[str, Any], pretrained: Mapping[str, Any], expert_accuracy: Mapping[str, float],
                  split: str = "test") -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every expert's verdict; ``pretrained[task]`` holds the frozen base encoder's features (the probe's input)."""
    out = {}
    for name, expert in experts.items():
        scored = pretrained[name].split(split)
        probe = load_probe(expert.path, int(head_output_count(expert.head) or 0))
        probe_accuracy = None
        if probe is not None:
            with torch.no_grad():
                probe_accuracy = accuracy(probe(scored.features).argmax(1), scored.labels)
        out[name] = expert_verdict(name, expert_accuracy[name], probe_accuracy, majority_rate(scored.labels),
                                   read_training_log(expert.path))  # fmt: skip
    return out


def warnings_for(verdicts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per expert that is no upper bound."""
    lines = []
    for name, v in verdicts.items():
        if v["below_probe"]:
            lines.append(f"WARNING: expert '{name}' ({100 * v['test_accuracy']:.1f}) does not beat its frozen-encoder "
                         f"linear probe ({100 * v['probe_accuracy']:.1f}): it is under-trained, not an upper bound")
        if v["below_majority"]:
            lines.append(f"WARNING: expert '{name}' ({100 * v['test_accuracy']:.1f}) does not beat the majority-class "
                         f"rate ({100 * v['majority_rate']:.1f})")
    return lines


def record_expert_checks(store: ResultStore, experts: Mapping[str, Any], pretrained: Mapping[str, Any],
                         expert_accuracy: Mapping[str, float], log: Callable[[str], None]) -> None:  # fmt: skip
    """Store (meta ``experts``) and log each expert against its frozen-encoder probe and the majority rate."""
    verdicts = check_experts(experts, pretrained, expert_accuracy)
    store.set_meta("experts", verdicts)
    for name, v in verdicts.items():
        probe = "–" if v["probe_accuracy"] is None else f"{100 * v['probe_accuracy']:.1f}"
        log(f"expert '{name}': test {100 * v['test_accuracy']:.1f}, frozen-encoder probe {probe}, majority "
            f"{100 * v['majority_rate']:.1f}")  # fmt: skip
    for line in warnings_for(verdicts):
        log(line)
