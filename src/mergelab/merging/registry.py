"""The one list of merging methods. Parameters, CLI help and YAML validation all come from each
method's ``Params`` model."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import ValidationError

from mergelab.core.errors import ConfigError
from mergelab.merging.base import MergeMethod


def method_classes() -> dict[str, type[MergeMethod]]:
    """Every weight-space merging method, by name (imported on demand)."""
    from mergelab.merging.methods.cart import Cart
    from mergelab.merging.methods.consensus import Consensus
    from mergelab.merging.methods.dare import Dare
    from mergelab.merging.methods.magmax import MagMax
    from mergelab.merging.methods.model_stock import ModelStock
    from mergelab.merging.methods.task_arithmetic import TaskArithmetic
    from mergelab.merging.methods.ties import Ties
    from mergelab.merging.methods.weight_average import WeightAverage

    classes = (WeightAverage, TaskArithmetic, Ties, Dare, MagMax, Cart, Consensus, ModelStock)
    return {cls.name: cls for cls in classes}


def get_method(name: str) -> type[MergeMethod]:
    """The method class called ``name``; an unknown name lists the known ones."""
    classes = method_classes()
    if name not in classes:
        raise ConfigError(f"unknown merge method '{name}'; choose one of: {', '.join(classes)}")
    return classes[name]


def _describe_field(name: str, info: Any) -> str:
    annotation = info.annotation
    allowed = _allowed_values(annotation)
    if allowed:
        return f"'{name}' must be one of {allowed}"
    bounds = _bounds(info)
    text = f"'{name}' ({_type_name(annotation)})"
    return text + (f" must be {' and '.join(bounds)}" if bounds else "")


def _bounds(info: Any) -> list[str]:
    out = []
    for meta in info.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                out.append(f"{symbol}{getattr(meta, attr)}")
    return out


def _allowed_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return []


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build_method(name: str, params: dict[str, Any] | None, num_models: int) -> MergeMethod:
    """Validate ``params`` against the method's declaration and instantiate it for ``num_models`` models."""
    cls = get_method(name)
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
            hint = _describe_field(key, fields[key]) if key in fields else ""
            problems.append(f"{key}={params.get(key)!r}: {err['msg']}" + (f" ({hint})" if hint else ""))
        raise ConfigError(f"invalid parameter for method '{name}': " + "; ".join(problems)) from None
    return cls(validated, num_models)


def describe_params(cls: type[MergeMethod]) -> list[dict[str, str]]:
    """Name, type, default, range and one-line doc of each parameter (for `mergelab methods`)."""
    rows = []
    for key, info in cls.Params.model_fields.items():
        allowed = _allowed_values(info.annotation)
        bounds = _bounds(info)
        rows.append(
            {
                "name": key,
                "type": _type_name(info.annotation),
                "default": repr(info.get_default(call_default_factory=True)),
                "range": " | ".join(map(str, allowed)) if allowed else " ".join(bounds),
                "doc": info.description or "",
            }
        )
    return rows


def list_methods() -> list[dict[str, Any]]:
    """Every method with its summary, flags and parameter table."""
    return [
        {
            "name": name,
            "summary": cls.summary,
            "needs_base": cls.needs_base,
            "transductive": cls.transductive,
            "params": describe_params(cls),
        }
        for name, cls in method_classes().items()
    ]
