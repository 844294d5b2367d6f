"""The bench's only contact with the method registry (``mergelab.api``): validate, merge, the transductive mark.

Each function below is the one place its question is asked; the bench never branches on the kind of method.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.api import build_method, get_method_spec, merge_experts
from mergelab.learned.api import info_as_json

State = dict[str, Any]


def validate_method_params(name: str, params: dict[str, Any], num_models: int) -> None:
    """Fail before any work on a wrong method name or parameter (a ConfigError naming it)."""
    build_method(name, params, num_models)


def is_transductive(name: str) -> bool:
    """Whether a merging method learns from unlabelled test inputs (its rows are then marked †)."""
    return get_method_spec(name).transductive


def merge_state(name: str, base_path: Path, experts: Mapping[str, Path], tasks: Mapping[str, Any],
                params: Mapping[str, Any], *, max_length: int, memo: dict[Any, Any],
                device: Any = None) -> tuple[State, dict[str, Any] | None]:  # fmt: skip
    """The merged encoder state of ``experts`` by method ``name``, and what a method that reads data learned or
    chose, as JSON (None for a weight-space one). A data-dependent method reads each expert's own task (the split
    it declares); ``memo`` keeps what it can reuse across one method's grid values."""
    result = merge_experts(name, base_path, experts, tasks, max_length=max_length, memo=memo, device=device, **params)
    if not get_method_spec(name).reads_data:
        return result.state, None
    return result.state, info_as_json({**result.info, "method": result.method, "split": result.reads,
                                       "transductive": result.transductive})  # fmt: skip
