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


class AdaMergingParams(MethodParams):
    granularity: Literal["layer", "task"] = Field("layer", description="one coefficient per (task, tensor) or per task")
    steps: int = Field(30, ge=0, description="Adam steps (the original: 500; CPU-sized default)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate on the coefficients")
    init: float = Field(0.3, description="initial coefficient (the 'prior')")
    clamp: bool = Field(True, description="clamp coefficients to [0, 1] in the forward pass (original; FusionBench: no)")
    plus: bool = Field(False, description="AdaMerging++: TIES-trimmed, sign-agreeing task vectors")
    batch_size: int = Field(16, ge=1, description="unlabelled test inputs per task per step")
    num_examples: int = Field(64, ge=1, description="unlabelled test inputs per task, cycled over steps")


def _run_adamerging(params: AdaMergingParams, base: str, experts: Sequence[str], texts: Sequence[Sequence[str]],
                    max_length: int, test_texts: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    from mergelab.learned.adamerging import adamerging
    from mergelab.models.hf import load_encoder, load_task_model

    if test_texts is None:
        raise ConfigError("adamerging learns on unlabelled test inputs; pass each task's test texts")
    encoder = load_encoder(base, base)
    models = [load_task_model(path) for path in experts]
    tokenizer, size = encoder.tokenizer, params.batch_size
    batches = [[dict(tokenizer(list(t)[i : i + size], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")) for i in range(0, min(len(t), params.num_examples), size)]
               for t in test_texts]  # fmt: skip

    def features_of(output: Any) -> torch.Tensor:
        return output.pooler_output if encoder.pooling == "pooler" else output.last_hidden_state[:, 0]

    merged, _ = adamerging(encoder.model, features_of, encoder.model.state_dict(),
                           [m.encoder.model.state_dict() for m in models], [m.head for m in models], batches,
                           granularity=params.granularity, steps=params.steps, lr=params.lr, init=params.init,
                           clamp=params.clamp, plus=params.plus)  # fmt: skip
    return merged


DATA_METHODS: dict[str, tuple[type[MethodParams], Callable[..., dict[str, torch.Tensor]], str]] = {
    "regmean": (RegMeanParams, _run_regmean, "RegMean: closed-form least squares per Linear layer from input Grams"),
    "fisher": (FisherParams, _run_fisher, "Fisher merging with an exact per-example diagonal Fisher"),
    "adamerging": (AdaMergingParams, _run_adamerging,
                   "AdaMerging: coefficients learned by entropy minimisation on unlabelled test inputs (transductive)"),
}


TRANSDUCTIVE = {"adamerging"}  # learn from the unlabelled inputs that are later scored


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
                    texts: Sequence[Sequence[str]], max_length: int = 64,
                    test_texts: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Merge ``experts`` (HF classifier folders) with a data-dependent method, using each task's unlabelled train
    texts (or, for transductive methods, its unlabelled test texts)."""
    validated = validate_data_params(name, params)
    runner = DATA_METHODS[name][1]
    if name in TRANSDUCTIVE:
        return runner(validated, str(base), [str(e) for e in experts], texts, max_length, test_texts=test_texts)
    return runner(validated, str(base), [str(e) for e in experts], texts, max_length)
