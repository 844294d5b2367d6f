"""What every protocol sees and returns, and the helpers the protocols share (the list of protocols: ``registry``).

A protocol is a pure function ``fn(ctx, *, seed, shots, **options) -> ProtocolOutcome`` of cached features and
the task's fine-tuned head. Heads are never modified: protocols that train start from ``copy.deepcopy(head)``,
and scoring runs on a frozen copy in eval mode. Everything a protocol trains is seeded from ``seed`` inside a
forked RNG, so the global torch RNG is left as it was.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.evaluation.types import SplitFeatures, TaskFeatures

PREDICT_CHUNK = 4096  # rows per forward pass when scoring a head


@dataclass(frozen=True)
class ProtocolContext:
    """Inputs of one (encoder, task) evaluation.

    ``evaluated``: features of the evaluated encoder (merged, pretrained, or even the fine-tuned one for bounds).
    ``head``: the task's fine-tuned head, any module mapping [N, d] → [N, C] logits (never modified).
    ``finetuned``: features of the task's own fine-tuned encoder (teacher/target of ft_classifier, aligned,
    surgery). ``ensemble_features``: features of all T fine-tuned encoders on this task (ensemble only).
    ``eval_split``: the scored split, "test" by default, "validation" for hyper-parameter selection.
    """

    task: str
    evaluated: TaskFeatures
    head: nn.Module
    finetuned: TaskFeatures | None = None
    ensemble_features: list[TaskFeatures] = field(default_factory=list)
    eval_split: str = "test"

    def __post_init__(self) -> None:
        expected = head_input_width(self.head)
        sources = [("evaluated", self.evaluated), ("fine-tuned", self.finetuned), *(
            (f"ensemble member {i}", f) for i, f in enumerate(self.ensemble_features))]
        for what, features in sources:
            width = None if features is None else features.width
            if expected is not None and width is not None and width != expected:
                raise DataError(
                    f"task '{self.task}': the {what} encoder gives {width}-wide features but the task's head takes "
                    f"{expected}; evaluate an encoder of the fine-tuned models' architecture (hidden size {expected})"
                )

    def eval_features(self) -> SplitFeatures:
        return self.evaluated.split(self.eval_split)

    def require_finetuned(self, protocol: str) -> TaskFeatures:
        if self.finetuned is None:
            raise DataError(
                f"protocol '{protocol}' on task '{self.task}' needs the fine-tuned encoder's features; "
                f"pass ProtocolContext(finetuned=...)"
            )
        return self.finetuned


@dataclass
class ProtocolOutcome:
    """One protocol run: accuracy in [0, 1], predicted class per eval item, and extras (JSON-able)."""

    accuracy: float
    predictions: torch.Tensor
    transductive: bool
    extras: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# helpers


def head_input_width(head: nn.Module) -> int | None:
    """The feature width a head takes: its first Linear layer's ``in_features`` (None for other heads)."""
    first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    return None if first is None else int(first.in_features)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the torch RNG seeded by ``seed`` and restore the caller's RNG state afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (1 << 63))
        yield


def frozen_copy(head: nn.Module) -> nn.Module:
    """A deep copy of ``head`` in eval mode without gradients (the original is untouched)."""
    clone = copy.deepcopy(head).eval()
    for param in clone.parameters():
        param.requires_grad_(False)
    return clone


def trainable_copy(head: nn.Module) -> nn.Module:
    """A deep copy of ``head`` with every parameter trainable (the original is untouched)."""
    clone = copy.deepcopy(head)
    for param in clone.parameters():
        param.requires_grad_(True)
    return clone


def head_logits(head: nn.Module, features: torch.Tensor, chunk: int = PREDICT_CHUNK) -> torch.Tensor:
    """Logits of a frozen copy of ``head`` on ``features`` [N, d], computed in chunks without gradients."""
    frozen = frozen_copy(head).to(features.device)
    with torch.no_grad():
        parts = [frozen(features[i : i + chunk]) for i in range(0, len(features), chunk)]
    if not parts:
        raise DataError("cannot score an empty split: it has no examples")
    logits = torch.cat(parts)
    if logits.ndim != 2 or len(logits) != len(features):
        raise DataError(f"a head must map [N, d] features to [N, C] logits; got {tuple(logits.shape)}")
    return logits


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``predictions`` equal to ``labels``, exactly ``correct / n`` as a Python float (every item
    counts; nothing is dropped): 27 of 80 is 0.3375, not float32's 0.3375000059604645."""
    if len(labels) == 0:
        raise DataError("cannot compute accuracy on an empty split")
    return int((predictions.cpu() == labels.cpu()).sum()) / len(labels)


def num_classes(head: nn.Module, features: torch.Tensor) -> int:
    """Number of classes C of ``head`` (read from its output on one feature row)."""
    return int(head_logits(head, features[:1]).shape[1])


def check_labels_fit(task: str, split: SplitFeatures, classes: int, split_name: str) -> None:
    """Labels of ``split`` must be valid class ids of a ``classes``-way head."""
    labels = split.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise DataError(
            f"task '{task}' {split_name} labels span [{int(labels.min())}, {int(labels.max())}] but the head "
            f"has {classes} outputs; use the head that was fine-tuned on this task"
        )


def paired_split(
    task: str, a: TaskFeatures, b: TaskFeatures, split: str, what: str
) -> tuple[SplitFeatures, SplitFeatures]:
    """The same split of two encoders' features; they must come from the same inputs in the same order."""
    sa, sb = a.split(split), b.split(split)
    if len(sa) != len(sb) or not torch.equal(sa.labels.cpu(), sb.labels.cpu()):
        raise DataError(
            f"task '{task}' {split} split: {what} features do not come from the same inputs in the same "
            f"order ({len(sa)} vs {len(sb)} items, or different labels); extract both from the same data"
        )
    return sa, sb


def outcome(logits: torch.Tensor, labels: torch.Tensor, transductive: bool, **extras: Any) -> ProtocolOutcome:
    """A ProtocolOutcome from eval-split logits (argmax predictions, accuracy on all items)."""
    predictions = logits.argmax(dim=1).cpu()
    return ProtocolOutcome(accuracy(predictions, labels), predictions, transductive, dict(extras))


def reject_unknown_options(protocol: str, options: dict[str, Any], fn: Callable[..., Any]) -> None:
    """ConfigError for options a protocol function does not declare, listing the ones it does."""
    if not options:
        return
    accepted = [
        name
        for name, param in inspect.signature(fn).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("seed", "shots")
    ]
    raise ConfigError(
        f"unknown option(s) {', '.join(repr(o) for o in sorted(options))} for protocol '{protocol}'; "
        f"its options are: {', '.join(accepted) or '(none)'}"
    )


def positive(protocol: str, name: str, value: float, integer: bool = False) -> None:
    """ConfigError unless ``value`` is a positive number (an integer when ``integer``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"protocol '{protocol}': option '{name}' must be {kind}, got {value!r}")
