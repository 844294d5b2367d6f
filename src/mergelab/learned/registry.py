"""Data-dependent merging methods: they need the experts' activations on task inputs, so they run on whole
(small) models in memory rather than through the streaming engine. Validated like the weight-space methods."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from mergelab.errors import ConfigError
from mergelab.merging.base import MethodParams


class RegMeanParams(MethodParams):
    alpha: float = Field(0.95, ge=0.0, le=1.0, description="off-diagonal Gram shrinkage (1 = none; FusionBench CLIP 0.95)")
    num_examples: int = Field(256, ge=1, description="unlabelled train inputs per task for the Grams")


def _run_regmean(params: RegMeanParams, base: str, experts: Sequence[str], texts: Sequence[Sequence[str]],
                 max_length: int) -> dict[str, torch.Tensor]:  # fmt: skip
    from mergelab.learned.regmean import regmean

    return regmean(base, experts, texts, alpha=params.alpha, num_examples=params.num_examples, max_length=max_length)


class FisherParams(MethodParams):
    num_examples: int = Field(64, ge=1, description="unlabelled train inputs per task for each diagonal Fisher")
    label_mode: Literal["expected", "sampled"] = Field(
        "expected", description="sum over classes weighted by p (exact) or sample y ~ p (one backward pass)"
    )
    normalize: bool = Field(True, description="weight each model by 1/‖F_t‖ (FusionBench default)")


def _run_fisher(params: FisherParams, base: str, experts: Sequence[str], texts: Sequence[Sequence[str]],
                max_length: int) -> dict[str, torch.Tensor]:  # fmt: skip
    from mergelab.learned.fisher import fisher

    return fisher(base, experts, texts, num_examples=params.num_examples, label_mode=params.label_mode,
                  normalize=params.normalize, max_length=max_length)  # fmt: skip


DATA_METHODS: dict[str, tuple[type[MethodParams], Callable[..., dict[str, torch.Tensor]], str]] = {
    "regmean": (RegMeanParams, _run_regmean, "RegMean: closed-form least squares per Linear layer from input Grams"),
    "fisher": (FisherParams, _run_fisher, "Fisher merging with an exact per-example diagonal Fisher"),
}


def data_method_names() -> list[str]:
    return list(DATA_METHODS)


def validate_data_params(name: str, params: dict[str, Any] | None) -> MethodParams:
    if name not in DATA_METHODS:
        raise ConfigError(f"unknown data-dependent method '{name}'; choose one of: {', '.join(DATA_METHODS)}")
    cls = DATA_METHODS[name][0]
    unknown = sorted(set(params or {}) - set(cls.model_fields))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for method '{name}'; its parameters are: {', '.join(cls.model_fields)}")
    try:
        return cls(**(params or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid parameter for method '{name}': {problems}") from None


def run_data_method(name: str, params: dict[str, Any] | None, base: str, experts: Sequence[str],
                    texts: Sequence[Sequence[str]], max_length: int = 64) -> dict[str, torch.Tensor]:  # fmt: skip
    """Merge ``experts`` (HF classifier folders) with a data-dependent method, using each task's unlabelled texts."""
    validated = validate_data_params(name, params)
    return DATA_METHODS[name][1](validated, str(base), [str(e) for e in experts], texts, max_length)
