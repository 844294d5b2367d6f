"""Experiment config (YAML, pydantic-validated)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from mergelab.bench.executor import ExecutorConfig
from mergelab.bench.methods import validate_method_params
from mergelab.core.config import StrictModel, load_yaml_config
from mergelab.core.errors import ConfigError
from mergelab.evaluation.protocols.aligned import TRANSFORMS
from mergelab.evaluation.protocols.registry import protocol_infos, validate_protocol_options
from mergelab.finetune.config import FinetuneConfig
from mergelab.learned.neulig import NeuLigOptions

PROTOCOLS = tuple(protocol_infos())  # the registry's names: a protocol added there is accepted here


class OptionalKeysModel(StrictModel):
    """A config section whose optional keys in ``omit_when_none`` are left out of its dump while unset, so adding
    one changes neither the stored config nor the cache keys of configs that do not use it."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if not (value is None and key in self.omit_when_none)}


class TaskSpec(OptionalKeysModel):
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"source", "subset", "splits"})

    name: str = Field(description="built-in offline task name, or the name of a user task")
    path: str | None = Field(default=None, description="folder with train/test(/validation) files or a saved DatasetDict")
    source: str | None = Field(default=None, description="a Hugging Face Hub dataset id (datasets.load_dataset)")
    subset: str | None = Field(default=None, description="the Hub dataset's configuration, e.g. 'sst2' of 'glue'")
    splits: dict[Literal["train", "validation", "test"], str] | None = Field(
        default=None, description="the dataset's split (or file stem) for train / validation / test, if not so named"
    )
    text_column: str = "text"
    label_column: str = "label"

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if self.path is not None and self.source is not None:
            raise ValueError(f"task '{self.name}' gives both path and source; give a local path or a Hub dataset id")
        if self.path is None and self.source is None and (self.subset is not None or self.splits is not None):
            raise ValueError(f"task '{self.name}': subset / splits need a path or a source")
        return self


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


class ExperimentConfig(OptionalKeysModel):
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"experts", "sampling_rates"})

    base: str = Field(default="minilm", description="'minilm' (offline all-MiniLM-L6-v2), 'efficientnet-lite0' (offline "
                      "ImageNet EfficientNet-Lite0, for image tasks), a local path, or an HF id")
    tasks: list[TaskSpec] = Field(min_length=1)
    data: DataSpec = Field(default_factory=DataSpec)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="the experts' recipe")
    experts: dict[str, str] | None = Field(
        default=None, description="existing experts, task → classifier folder or Hub id, used instead of fine-tuning "
        "(checked against the base); every task needs one; finetune then serves only the multi-task baseline and "
        "the default evaluation max_length"
    )  # fmt: skip
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
    sampling_rates: list[float] | None = Field(
        default=None, description="FT-Classifier also refits on these fractions of the unlabelled test inputs, e.g. "
        "[0.005, 0.01] (the paper's CV appendix; transductive, stored as ft_classifier@1% with shots 0)"
    )  # fmt: skip
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
    device: str | None = Field(default=None, exclude=True, description="where models and protocols run: auto "
                               "(unset: CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps; not in the stored config")
    executor: ExecutorConfig | None = Field(default=None, exclude=True, description="where the units of work run: "
                                            "local (unset) or ray; not in the stored config, nor in any cache key")

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: list[int]) -> list[int]:
        if not shots or any(k < 1 for k in shots):
            raise ValueError("shots must be a non-empty list of positive integers")
        return sorted(set(shots))

    @field_validator("sampling_rates")
    @classmethod
    def _fraction_rates(cls, rates: list[float] | None) -> list[float] | None:
        if rates is not None and (not rates or any(not 0 < r <= 1 for r in rates)):
            raise ValueError("sampling_rates must be a non-empty list of fractions in (0, 1], e.g. [0.005, 0.01]")
        return None if rates is None else sorted(set(rates))

    @field_validator("protocol_options")
    @classmethod
    def _known_protocol_options(cls, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each protocol's options checked by its options model at load time; the dict is kept as written (the
        stored config dump does not change), the protocols fill in their defaults when they run."""
        for name, values in options.items():
            try:
                validate_protocol_options(name, values)
            except ConfigError as exc:
                raise ConfigError(f"protocol_options: {exc}") from None
        return options

    @model_validator(mode="after")
    def _check_names(self) -> ExperimentConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        labels = [m.display for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two methods share the display name in {labels}; give one a 'label'")
        return self

    @model_validator(mode="after")
    def _rates_have_a_protocol(self) -> ExperimentConfig:
        able = [name for name, info in protocol_infos().items() if info.sampling_rate]
        if self.sampling_rates and not set(able) & set(self.protocols):
            raise ValueError(f"sampling_rates apply to the protocol(s) {', '.join(able)}; add one to protocols")
        return self

    @model_validator(mode="after")
    def _experts_cover_tasks(self) -> ExperimentConfig:
        if self.experts is None:
            return self
        names = [t.name for t in self.tasks]
        missing, unknown = [n for n in names if n not in self.experts], sorted(set(self.experts) - set(names))
        if missing or unknown:
            raise ValueError(f"experts must give exactly one expert per task (tasks: {names}); "
                             f"missing: {missing}, not a task: {unknown}")  # fmt: skip
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


BUILTIN_CONFIGS = ("demo", "full", "vision")


def builtin_config(name: str) -> ExperimentConfig:
    """An embedded experiment: ``demo`` (the default job), ``full`` (every method and protocol) or ``vision``
    (EfficientNet-Lite0 on three offline image tasks)."""
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"no built-in experiment '{name}'; built in: {', '.join(BUILTIN_CONFIGS)} (or a YAML path)")
    return load_experiment_config(Path(str(files("mergelab.bench").joinpath(f"configs/{name}.yaml"))))


def demo_config() -> ExperimentConfig:
    """The embedded default experiment (``mergelab/bench/configs/demo.yaml``)."""
    return builtin_config("demo")
