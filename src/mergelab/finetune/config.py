"""The experts' recipe: one pydantic model for the Python API, the bench config (``finetune:``) and the cache key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from mergelab.core.config import DEFAULT_MAX_LENGTH, StrictModel, validate_config
from mergelab.core.errors import ConfigError
from mergelab.core.rng import derive_seed


class FinetuneConfig(StrictModel):
    """Every hyper-parameter that determines an expert (with the base and the training data).

    The defaults are a recipe that converges within the demo's budget: a fresh head with its own, larger learning
    rate (``head_lr`` 2e-3; a head drawn from N(0, 0.02) at the encoder's 1e-4 moves too little in a few dozen
    steps), encoder lr 1e-4, 3 epochs, 10 % linear warm-up then linear decay, AdamW. Measured on the demo's
    newsgroups (1,200 train examples; frozen-encoder probe 75.3 on test): this recipe 77.0; the same for 2 epochs
    72.3; LP-FT (``head_init: probe``, lr 1e-4, 3 epochs: the head starts from the probe, which already fits the
    train split, so little gradient is left) 75.7.
    ``pooling: mean`` gives a pooled classifier (mean of the last hidden states over non-padding tokens, one Linear
    head: the FT-Classifier paper's architecture and all-MiniLM-L6-v2's own embedding); ``native`` gives the
    family's ``AutoModelForSequenceClassification`` (e.g. BERT's pooler + classifier). ``head_lr=None`` uses
    ``lr``. The head's random initialisation and the batch order use a seed derived from ``seed`` and the task
    name, so two tasks never start from the same head rows.
    ``precision``: fp32 (default), or bf16 / fp16 autocast on an accelerator; it changes the weights, so it is
    part of the dump (and the experts' cache key) when it is not fp32, and absent for fp32 (keys and stored runs
    of earlier versions stay valid). The device is not a hyper-parameter (``finetune_expert(device=...)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # the field order is the bench config's (stored in runs)

    epochs: float = Field(default=3.0, gt=0, description="passes over the train split (fractional: stop early)")
    lr: float = Field(default=1e-4, gt=0, description="the encoder's learning rate")
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=2, description="tokens per training example")
    batch_size: int = Field(default=32, ge=1)
    train_size: int | None = Field(default=None, ge=1, description="use at most this many train examples")
    seed: int = 0
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    pooling: Literal["mean", "native"] = Field(
        default="mean", description="mean: pooled classifier (mean of last hidden states + Linear); native: "
        "the family's AutoModelForSequenceClassification"
    )  # fmt: skip
    head_init: Literal["probe", "random"] = Field(default="random", description="probe: LP-FT warm start")
    head_lr: float | None = Field(default=2e-3, gt=0, description="the head's lr (default: lr)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="fp32, or bf16 / fp16 autocast (accelerators only; fp16 with loss scaling)"
    )

    @model_serializer(mode="wrap")
    def _dump_without_default_precision(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The dump without ``precision`` when it is fp32: expert cache keys and stored bench configs unchanged."""
        data = handler(self)
        if self.precision == "fp32":
            data.pop("precision", None)
        return data

    @classmethod
    def from_kwargs(cls, **hyper: Any) -> FinetuneConfig:
        """The config of keyword hyper-parameters (defaults filled in); a wrong name or value is a ConfigError."""
        unknown = sorted(set(hyper) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"unknown fine-tuning parameter(s) {unknown}; known: {', '.join(sorted(cls.model_fields))}")
        return validate_config(hyper, cls, "(fine-tuning)")

    def task_seed(self, task_name: str) -> int:
        """The seed of one task's head initialisation, dropout and batch order."""
        return derive_seed(self.seed, f"expert:{task_name}")
