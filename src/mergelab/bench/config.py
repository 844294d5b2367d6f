"""Experiment config (YAML, pydantic-validated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mergelab.core.config import StrictModel, load_yaml_config
from mergelab.finetune.experts import FinetuneConfig

PROTOCOLS = ("current", "knn", "aligned", "ft_classifier", "linear_probe", "ensemble", "surgery")
TRANSFORMS = ("affine", "linear", "invertible", "euclidean", "orthogonal", "scaling", "procrustes")


class TaskSpec(StrictModel):
    name: str = Field(description="built-in offline task name, or the name of a user task")
    path: str | None = Field(default=None, description="folder with train/test(/validation) files or a saved DatasetDict")
    text_column: str = "text"
    label_column: str = "label"


class DataSpec(StrictModel):
    train_size: int = Field(default=2000, ge=10, description="train examples per task (fine-tuning + few-shot pool)")
    validation_size: int = Field(default=500, ge=10, description="validation examples per task (hyper-parameter selection)")
    test_size: int = Field(default=1000, ge=10, description="test examples per task")
    seed: int = 0
    fewshot_pool_per_class: int = Field(
        default=50, ge=1, description="few-shot samples are drawn per seed from this many train examples per class "
        "(all of a smaller class); 50 keeps 5 seeds' 10-shot draws overlapping little"
    )  # fmt: skip


_FT = FinetuneConfig()  # the API's defaults: one recipe for configs and the Python API


class FinetuneSpec(StrictModel):
    """The experts' recipe (mergelab.finetune.experts.FinetuneConfig, whose defaults these are)."""

    epochs: float = Field(default=_FT.epochs, gt=0)
    lr: float = Field(default=_FT.lr, gt=0)
    max_length: int = Field(default=_FT.max_length, ge=8)
    batch_size: int = Field(default=_FT.batch_size, ge=1)
    train_size: int | None = Field(default=None, ge=10, description="use at most this many train examples")
    seed: int = _FT.seed
    weight_decay: float = _FT.weight_decay
    warmup_ratio: float = Field(default=_FT.warmup_ratio, ge=0, lt=1)
    pooling: Literal["mean", "native"] = Field(
        default=_FT.pooling, description="mean: pooled classifier (mean of last hidden states + Linear); native: "
        "the family's AutoModelForSequenceClassification"
    )  # fmt: skip
    head_init: Literal["probe", "random"] = Field(default=_FT.head_init, description="probe: LP-FT warm start")
    head_lr: float | None = Field(default=_FT.head_lr, gt=0, description="the head's lr (default: lr)")


class MethodSpec(StrictModel):
    name: str
    params: dict[str, Any] = Field(default_factory=dict, description="fixed parameters")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="values chosen on the validation split")
    label: str | None = Field(default=None, description="display name (default: the method name)")

    @property
    def display(self) -> str:
        return self.label or self.name


class NeuLigSpec(StrictModel):
    """The NeuLig router (algorithms.md §14): trained on the experts' train features, evaluated on each test split."""

    loss: Literal["ce", "entropy"] = Field(default="ce", description="CE on labels (sup) or entropy (semi)")
    steps: int = Field(default=300, ge=1, description="Adam steps (round-robin over tasks)")
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=128, ge=1)
    train_examples: int | None = Field(default=512, ge=1, description="train inputs per task for the router")
    weights_from: list[Literal["first", "mean"]] = Field(
        default_factory=lambda: ["first", "mean"], min_length=1,
        description="merge weights of a test batch: its first item's (reference code) and/or the batch mean",
    )  # fmt: skip
    eval_batch_size: int = Field(default=16, ge=1, description="test items per merged model (one task per batch)")
    test_examples: int | None = Field(default=None, ge=1, description="first N test items per task (None: all)")
    regulariser_scale: float = Field(default=100.0, gt=0)
    seed: int = 0


class ExperimentConfig(StrictModel):
    base: str = Field(default="minilm", description="'minilm' (offline all-MiniLM-L6-v2), a local path, or an HF id")
    tasks: list[TaskSpec] = Field(min_length=1)
    data: DataSpec = Field(default_factory=DataSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    methods: list[MethodSpec] = Field(default_factory=list)
    protocols: list[Literal[PROTOCOLS]] = Field(default_factory=lambda: ["current", "knn", "ft_classifier"])  # type: ignore[valid-type]
    transforms: list[Literal[TRANSFORMS]] = Field(default_factory=lambda: ["orthogonal", "procrustes"])  # type: ignore[valid-type]
    protocol_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options per protocol, e.g. {ft_classifier: {epochs: 5}}"
    )
    aligned_methods: list[str] | None = Field(
        default=None, description="methods (display names) evaluated with the aligned transforms (default: all)"
    )
    shots: list[int] = Field(default_factory=lambda: [5])
    seeds: int = Field(default=5, ge=1)
    select_on: Literal["validation"] = "validation"
    select_protocol: Literal["current", "knn", "ft_classifier"] = "current"
    multitask: bool = Field(default=False, description="also train the multi-task-learning baseline (Table 2's MTL row)")
    neulig: NeuLigSpec | None = Field(default=None, description="also train and evaluate the NeuLig router")
    bounds: bool = Field(default=True, description="evaluate the fine-tuned experts and the pretrained encoder")
    tsne_tasks: list[str] = Field(default_factory=list, description="tasks for the t-SNE figure (default: first two)")
    tsne_method: str | None = None
    max_length: int | None = Field(default=None, description="evaluation max length (default: finetune.max_length)")
    batch_size: int = 64
    threads: int = Field(default=2, ge=1, description="torch threads for fine-tuning and feature extraction")
    protocol_threads: int = Field(default=1, ge=1, description="torch threads for the few-shot protocols (dense ones, aligned and surgery, use threads)")

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: list[int]) -> list[int]:
        if not shots or any(k < 1 for k in shots):
            raise ValueError("shots must be a non-empty list of positive integers")
        return sorted(set(shots))

    @model_validator(mode="after")
    def _check_names(self) -> ExperimentConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        labels = [m.display for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two methods share the display name in {labels}; give one a 'label'")
        return self

    @property
    def eval_max_length(self) -> int:
        return self.max_length or self.finetune.max_length


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    cfg = load_yaml_config(path, ExperimentConfig)
    from mergelab.learned.registry import data_method_names, validate_data_params
    from mergelab.merging.registry import build_method

    for method in cfg.methods:  # fail before any work on a wrong method name or parameter
        sample = {key: values[0] for key, values in method.grid.items() if values}
        if method.name in data_method_names():
            validate_data_params(method.name, {**method.params, **sample})
        else:
            build_method(method.name, {**method.params, **sample}, max(len(cfg.tasks), 2))
    return cfg


BUILTIN_CONFIGS = ("demo", "full")


def builtin_config(name: str) -> ExperimentConfig:
    """An embedded experiment: ``demo`` (the default job) or ``full`` (every method and protocol)."""
    from importlib.resources import files

    from mergelab.core.errors import ConfigError

    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"no built-in experiment '{name}'; built in: {', '.join(BUILTIN_CONFIGS)} (or a YAML path)")
    return load_experiment_config(Path(str(files("mergelab.bench").joinpath(f"configs/{name}.yaml"))))


def demo_config() -> ExperimentConfig:
    """The embedded default experiment (``mergelab/bench/configs/demo.yaml``)."""
    return builtin_config("demo")
