"""What every merging method declares, and the one validation of its parameters.

A :class:`MethodSpec` says what a method is called, what its parameters are (a pydantic :class:`MethodParams`
model), what it reads (``"nothing"``: weights only; ``"train"`` inputs; labelled ``"validation"`` data; unlabelled
``"test"`` inputs, which makes it transductive), how it runs (``"streaming"``, one tensor at a time, or
``"in_memory"``, whole small models), how many models it needs, whether it needs the base, and what it produces.
Both method families (the streaming ``MergeMethod`` and the data-dependent ``DataMergeMethod``) are :class:`Method`
subclasses that carry their spec as ``spec``; entries that are not single-model merges (the NeuLig router, PLeaS,
TALL-mask reconstructions) are specs alone. The registry of all of them is ``mergelab.api.registry``.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from mergelab.core.errors import ConfigError

Reads = Literal["nothing", "train", "validation", "test"]
Runs = Literal["streaming", "in_memory"]
Produces = Literal["merged_model", "per_task_models", "router", "wider_model"]

READS_TEXT = {
    "nothing": "weights only",
    "train": "unlabelled train inputs",
    "validation": "labelled validation data",
    "test": "unlabelled test inputs, transductive",
}
PRODUCES_TEXT = {
    "merged_model": "one merged model",
    "per_task_models": "one model per task, not a single merged model",
    "router": "a router that merges per input batch, not one static model",
    "wider_model": "one model of 1× to 2× width",
}


class MethodParams(BaseModel):
    """Base for a method's parameters: unknown keys are errors, values are validated, instances are frozen."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


P = TypeVar("P", bound=MethodParams)


@dataclass(frozen=True)
class MethodSpec:
    """One method, as the CLI, the benchmark and ``mergelab.merge`` see it (module doc)."""

    name: str
    summary: str
    params: type[MethodParams]
    reads: Reads = "nothing"
    needs_labels: bool = False
    runs: Runs = "streaming"
    min_models: int = 1
    needs_base: bool = True
    produces: Produces = "merged_model"
    run_with: str = "mergelab.merge(...); `mergelab merge`"

    @property
    def transductive(self) -> bool:
        """Whether it learns from the unlabelled test inputs that are scored afterwards."""
        return self.reads == "test"

    @property
    def reads_data(self) -> bool:
        return self.reads != "nothing"

    def describe_reads(self) -> str:
        """What it reads, in words (e.g. "labelled validation data")."""
        return "labelled train data" if (self.reads == "train" and self.needs_labels) else READS_TEXT[self.reads]

    def validate(self, params: Mapping[str, Any] | MethodParams | None) -> MethodParams:
        """The validated parameters (see :func:`validate_params`)."""
        return validate_params(self.name, self.params, params)

    def check_count(self, num_models: int) -> None:
        if num_models < self.min_models:
            raise ConfigError(
                f"method '{self.name}' needs at least {self.min_models} fine-tuned models, got {num_models}"
            )


class Method:
    """What both method families share: the spec, validated parameters, the model count and ``info``.

    ``info`` is what the method learned or chose while merging (coefficients, λ per task, ...), for logs.
    """

    spec: ClassVar[MethodSpec]

    def __init__(self, params: MethodParams, num_models: int) -> None:
        self.spec.check_count(num_models)
        self.params = params
        self.num_models = num_models
        self.info: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.spec.name


# ---------------------------------------------------------------------------------------------- validation


def validate_params(method: str, model: type[P], params: Mapping[str, Any] | MethodParams | None) -> P:
    """``params`` checked against ``model``: unknown keys and invalid values raise one ``ConfigError`` that names
    the method, each wrong key with its value, and what the key accepts. An instance of ``model`` is returned as is."""
    if isinstance(params, model):
        return params
    values = dict(params.model_dump() if isinstance(params, BaseModel) else params or {})
    fields = model.model_fields
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(repr(u) for u in unknown)} for method '{method}'; "
            f"its parameters are: {', '.join(fields) or '(none)'}"
        )
    try:
        return model(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            hint = field_hint(key, fields[key]) if key in fields else ""
            problems.append(f"{key}={values.get(key)!r}: {err['msg']}" + (f" ({hint})" if hint else ""))
        raise ConfigError(f"invalid parameter for method '{method}': " + "; ".join(problems)) from None


def field_hint(key: str, info: Any) -> str:
    """What parameter ``key`` accepts: its allowed values, its bounds, or its type."""
    allowed = allowed_values(info.annotation)
    if allowed:
        return f"'{key}' must be one of {' | '.join(map(str, allowed))}"
    bounds = field_bounds(info)
    return f"'{key}' must be {' and '.join(bounds) if bounds else type_name(info.annotation)}"


def field_bounds(info: Any) -> list[str]:
    out = []
    for meta in info.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                out.append(f"{symbol}{getattr(meta, attr)}")
    return out


def allowed_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return []


def type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def describe_params(model: type[MethodParams]) -> list[dict[str, str]]:
    """Name, type, default, range and one-line doc of each parameter (for `mergelab methods`)."""
    rows = []
    for key, info in model.model_fields.items():
        allowed = allowed_values(info.annotation)
        rows.append(
            {
                "name": key,
                "type": type_name(info.annotation),
                "default": repr(info.get_default(call_default_factory=True)),
                "range": " | ".join(map(str, allowed)) if allowed else " ".join(field_bounds(info)),
                "doc": info.description or "",
            }
        )
    return rows
