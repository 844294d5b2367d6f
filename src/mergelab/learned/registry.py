"""The one list of data-dependent merging methods, validated like the weight-space methods.

``build_data_method(name, params)`` is the entry point; ``list_data_methods`` describes them (``mergelab methods``),
``validate_data_params`` checks a config before any work. ``mergelab.learned.api.merge_with_data`` runs one.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mergelab.core.errors import ConfigError
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
