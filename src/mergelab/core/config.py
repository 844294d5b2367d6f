"""Pydantic-validated YAML configs, with messages that name the wrong key and the allowed values."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergelab.core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

# Tokens per text input wherever one is read (fine-tuning, features, data-dependent merges, NeuLig, `eval`).
DEFAULT_MAX_LENGTH = 64


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckedModel(StrictModel):
    """A frozen pydantic model whose construction raises ``ConfigError`` (naming the bad key) instead of
    pydantic's ``ValidationError``, like every other bad input to mergelab."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self), f"({type(self).__name__})")) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One readable sentence per problem: the key path, what is wrong, the allowed keys or values."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, err["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            problems.append(f"unknown key '{loc}' (allowed keys: {allowed})")
        elif err["type"] == "literal_error":
            problems.append(f"'{loc}': {err['msg']}")
        elif err["type"] == "missing":
            problems.append(f"missing required key '{loc}'")
        else:
            problems.append(f"'{loc}': {err['msg']} (got {err.get('input')!r})")
    return f"invalid config {where}: " + "; ".join(problems)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        for candidate in (annotation, *typing.get_args(annotation)):
            inner = [a for a in (candidate, *typing.get_args(candidate)) if isinstance(a, type)]
            found = [a for a in inner if issubclass(a, BaseModel)]
            if found:
                current = found[0]
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def load_yaml_config(path: str | Path, model: type[ModelT]) -> ModelT:
    """Read a YAML file and validate it against ``model``; every problem becomes a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return validate_config(data or {}, model, str(path))


def validate_config(data: Any, model: type[ModelT], where: str = "") -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, where)) from None


def parse_param(text: str) -> tuple[str, Any]:
    """'density=0.2' → ('density', 0.2); values are parsed as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"parameter '{text}' must look like key=value, e.g. --param scale=0.3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
