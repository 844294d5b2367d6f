"""Are the upper bounds bounds? Each expert against its frozen-encoder probe and the majority-class rate.

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
from mergelab.evaluation.protocols.common import accuracy
from mergelab.finetune.experts import TRAINING_LOG, load_probe
from mergelab.models.task_model import head_output_count


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
