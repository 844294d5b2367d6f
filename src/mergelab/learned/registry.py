"""The one list of data-dependent merging methods, validated like the weight-space methods.

``build_data_method(name, params)`` is the entry point; ``data_method_names``, ``validate_data_params``,
``run_data_method``, ``DATA_METHODS`` and ``TRANSDUCTIVE`` keep the older call sites (CLI, benchmark) working.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mergelab.errors import ConfigError
from mergelab.learned.base import DataMergeMethod
from mergelab.merging.base import MethodParams
from mergelab.merging.registry import describe_params


def data_method_classes() -> dict[str, type[DataMergeMethod]]:
    """Every data-dependent merging method, by name (imported on demand)."""
    from mergelab.learned.adamerging import AdaMerging
    from mergelab.learned.fisher import FisherBatchMerging, FisherMerging
    from mergelab.learned.regmean import RegMean
    from mergelab.learned.tall_masks import TallConsensus

    classes = (FisherMerging, FisherBatchMerging, RegMean, AdaMerging, TallConsensus)
    return {cls.name: cls for cls in classes}


def data_method_names() -> list[str]:
    return list(data_method_classes())


def get_data_method(name: str) -> type[DataMergeMethod]:
    """The method class called ``name``; an unknown name lists the known ones."""
    classes = data_method_classes()
    if name not in classes:
        raise ConfigError(f"unknown data-dependent merge method '{name}'; choose one of: {', '.join(classes)}")
    return classes[name]


def _hint(cls: type[DataMergeMethod], key: str) -> str:
    row = next((r for r in describe_params(cls) if r["name"] == key), None)
    if row is None or not row["range"]:
        return ""
    if "|" in row["range"]:
        return f"'{key}' must be one of {row['range']}"
    return f"'{key}' must be {row['range'].replace(' ', ' and ')}"


def build_data_method(name: str, params: dict[str, Any] | None = None) -> DataMergeMethod:
    """Validate ``params`` against the method's declaration and instantiate it."""
    cls = get_data_method(name)
    params = dict(params or {})
    fields = cls.Params.model_fields
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(repr(u) for u in unknown)} for method '{name}'; "
            f"its parameters are: {', '.join(fields) or '(none)'}"
        )
    try:
        validated = cls.Params(**params)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            hint = _hint(cls, key) if key in fields else ""
            problems.append(f"{key}={params.get(key)!r}: {err['msg']}" + (f" ({hint})" if hint else ""))
        raise ConfigError(f"invalid parameter for method '{name}': " + "; ".join(problems)) from None
    return cls(validated)


def list_data_methods() -> list[dict[str, Any]]:
    """Every data-dependent method with its summary, the split it reads, flags and parameter table."""
    return [
        {
            "name": name,
            "summary": cls.summary,
            "split": cls.split,
            "needs_labels": cls.needs_labels,
            "transductive": cls.transductive,
            "params": describe_params(cls),
        }
        for name, cls in data_method_classes().items()
    ]


def validate_data_params(name: str, params: dict[str, Any] | None) -> MethodParams:
    """The validated parameters of method ``name`` (raises ``ConfigError`` like ``build_data_method``)."""
    return build_data_method(name, params).params


def run_data_method(
    name: str,
    params: dict[str, Any] | None,
    base: str | Path,
    experts: Sequence[str | Path],
    texts: Sequence[Sequence[str]],
    max_length: int = 64,
    test_texts: Sequence[Sequence[str]] | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge HF classifier folders from plain text lists: each task's unlabelled train ``texts``, or its
    ``test_texts`` for transductive methods. Methods that select on labelled validation data need
    ``mergelab.learned.api.merge_with_data`` instead."""
    from mergelab.learned.api import expert_set_from_texts

    method = build_data_method(name, params)
    if method.split == "validation":
        raise ConfigError(f"method '{name}' needs labelled validation data; call mergelab.learned.api.merge_with_data")
    if method.split == "test" and test_texts is None:
        raise ConfigError(f"method '{name}' learns on unlabelled test inputs; pass each task's test texts")
    method.check_count(len(experts))
    chosen = test_texts if method.split == "test" else texts
    expert_set = expert_set_from_texts(base, experts, chosen, max_length=max_length, batch_size=batch_size, seed=seed)
    return method.merge(expert_set)


def __getattr__(name: str) -> Any:
    """``DATA_METHODS`` ({name: (Params, class, summary)}) and ``TRANSDUCTIVE`` (a frozenset), computed on access."""
    if name == "DATA_METHODS":
        return {n: (cls.Params, cls, cls.summary) for n, cls in data_method_classes().items()}
    if name == "TRANSDUCTIVE":
        return frozenset(n for n, cls in data_method_classes().items() if cls.transductive)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
