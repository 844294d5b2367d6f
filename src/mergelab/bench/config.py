"""Experiment config (YAML, pydantic-validated)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mergelab.bench.methods import validate_method_params
from mergelab.core.config import StrictModel, load_yaml_config
from mergelab.core.errors import ConfigError
from mergelab.evaluation.protocols.aligned import TRANSFORMS
from mergelab.evaluation.protocols.registry import protocol_infos
from mergelab.finetune.config import FinetuneConfig
from mergelab.learned.neulig import NeuLigOptions

PROTOCOLS = tuple(protocol_infos())  # the registry's names: a protocol added there is accepted here


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


class MethodSpec(StrictModel):
    name: str
    params: dict[str, Any] = Field(default_factory=dict, description="fixed parameters")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="values chosen on the validation split")
    label: str | None = Field(default=None, description="display name (default: the method name)")

    @property
    def display(self) -> str:
        return self.label or self.name


class ExperimentConfig(StrictModel):
    base: str = Field(default="minilm", description="'minilm' (offline all-MiniLM-L6-v2), a local path, or an HF id")
    tasks: list[TaskSpec] = Field(min_length=1)
    data: DataSpec = Field(default_factory=DataSpec)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="the experts' recipe")
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
    neulig: NeuLigOptions | None = Field(default=None, description="also train and evaluate the NeuLig router")
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
    """The validated config of a YAML file; a wrong method name or parameter fails here, before any work."""
    cfg = load_yaml_config(path, ExperimentConfig)
    for method in cfg.methods:
        sample = {key: values[0] for key, values in method.grid.items() if values}
        validate_method_params(method.name, {**method.params, **sample}, max(len(cfg.tasks), 2))
    return cfg


BUILTIN_CONFIGS = ("demo", "full")


def builtin_config(name: str) -> ExperimentConfig:
    """An embedded experiment: ``demo`` (the default job) or ``full`` (every method and protocol)."""
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"no built-in experiment '{name}'; built in: {', '.join(BUILTIN_CONFIGS)} (or a YAML path)")
    return load_experiment_config(Path(str(files("mergelab.bench").joinpath(f"configs/{name}.yaml"))))


def demo_config() -> ExperimentConfig:
    """The embedded default experiment (``mergelab/bench/configs/demo.yaml``)."""
    return builtin_config("demo")
