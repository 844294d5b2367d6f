"""What every protocol sees and returns, and the helpers the protocols share (the list of protocols: ``registry``).

A protocol is a pure function ``fn(ctx, *, seed, shots, **options) -> ProtocolOutcome`` of cached features and
the task's fine-tuned head; its options are declared once, as a ``ProtocolOptions`` model in its module, and
validated only by that model. Heads are never modified: protocols that train start from ``copy.deepcopy(head)``,
and scoring runs on a frozen copy in eval mode. Everything a protocol trains is seeded from ``seed`` inside a
forked RNG, so the global torch RNG is left as it was.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
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


# ------------------------------------------------------------------------------------------------------------
# options

OptionsT = TypeVar("OptionsT", bound="ProtocolOptions")


class ProtocolOptions(BaseModel):
    """Base of a protocol's options: one field per option (name, type, default, bounds, description), declared in
    the protocol's module and listed by the registry. Unknown keys and invalid values raise one ``ConfigError``
    naming the protocol, each bad option with its value and what it accepts; instances are frozen. Types are
    strict, as the protocols have always checked them: an integer option refuses 5.0, True and "5"; a number
    option accepts integers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    protocol: ClassVar[str] = "?"

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except ValidationError as exc:
            raise ConfigError(options_error(type(self), exc)) from None

    @classmethod
    def parse(cls: type[OptionsT], options: Mapping[str, Any] | None = None) -> OptionsT:
        """The validated options of ``options`` (option name → value)."""
        try:
            return cls.model_validate(dict(options or {}))
        except ValidationError as exc:
            raise ConfigError(options_error(cls, exc)) from None

    def given(self) -> dict[str, Any]:
        """The options that were set, converted to their declared types (defaults are not filled in)."""
        return self.model_dump(exclude_unset=True)


def options_error(model: type[ProtocolOptions], exc: ValidationError) -> str:
    """One line: the unknown options and the known ones, or each bad option with its value and what it accepts
    (a cross-option rule's message as it is)."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return (
            f"unknown option(s) {', '.join(repr(u) for u in unknown)} for protocol '{model.protocol}'; "
            f"its options are: {', '.join(model.model_fields) or '(none)'}"
        )
    problems: dict[str, str] = {}
    for err in errors:
        if not err["loc"]:  # a model validator: the rule's own message
            problems[""] = str(err.get("ctx", {}).get("error", err["msg"]))
            continue
        key = str(err["loc"][0])
        problems.setdefault(key, f"option '{key}' must be {accepted(model.model_fields[key])}, got {err['input']!r}")
    return f"protocol '{model.protocol}': " + "; ".join(problems.values())


def option_kind(info: FieldInfo) -> tuple[Any, bool]:
    """An option's type without ``None``, and whether it may be null."""
    union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(info.annotation) if union else ()
    kinds = [a for a in args if a is not type(None)] or [info.annotation]
    return kinds[0], type(None) in args


def option_type(info: FieldInfo) -> str:
    """'int', 'float | null', 'str' (a choice), ... for the options table."""
    kind, nullable = option_kind(info)
    name = "str" if typing.get_origin(kind) is typing.Literal else getattr(kind, "__name__", str(kind))
    return name + (" | null" if nullable else "")


def accepted(info: FieldInfo) -> str:
    """What an option accepts, in words: its choices, its range or its type (``or null`` when it may be unset)."""
    kind, nullable = option_kind(info)
    if typing.get_origin(kind) is typing.Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(kind)))
    elif kind is bool:
        text = "true or false"
    else:
        text = number_range(kind is int, info.metadata)
    return text + (" or null" if nullable else "")


def number_range(integer: bool, metadata: list[Any]) -> str:
    """'a positive integer', 'a number >= 0', 'a number in (0, 1]', ... from a field's annotated-types bounds."""
    bounds = {attr: getattr(m, attr) for m in metadata for attr in ("gt", "ge", "lt", "le") if hasattr(m, attr)}
    noun = "integer" if integer else "number"
    article = f"an {noun}" if integer else f"a {noun}"
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"{article} in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low == ("(", 0):
        return f"a positive {noun}"
    if low:
        return f"{article} {'>' if low[0] == '(' else '>='} {low[1]:g}"
    if high:
        return f"{article} {'<' if high[0] == ')' else '<='} {high[1]:g}"
    return article


def describe_options(model: type[ProtocolOptions]) -> list[dict[str, str]]:
    """Name, type, default, accepted values and description of each option (for `mergelab protocols`)."""
    rows = []
    for key, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append({"name": key, "type": option_type(info), "default": shown, "accepts": accepted(info),
                     "doc": info.description or ""})  # fmt: skip
    return rows
