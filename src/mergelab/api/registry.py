"""The one list of methods: every weight-space and data-dependent merge, plus the entries that are not one merged
model (TALL-mask reconstructions, the NeuLig router, PLeaS), each with its :class:`MethodSpec`.

``get_method_spec(name)`` / ``list_methods()`` are what the CLI and the benchmark read (what a method reads, whether
it is transductive, its parameters); ``build_method(name, params, num_models)`` validates parameters and builds a
method that ``mergelab.merge`` can run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergelab.core.errors import ConfigError
from mergelab.learned.adamerging import AdaMerging
from mergelab.learned.fisher import FisherBatchMerging, FisherMerging
from mergelab.learned.neulig import NEULIG_SPEC
from mergelab.learned.regmean import RegMean
from mergelab.learned.tall_masks import TALL_MASKS_SPEC, TallConsensus
from mergelab.merging.methods.cart import Cart
from mergelab.merging.methods.consensus import Consensus
from mergelab.merging.methods.dare import Dare
from mergelab.merging.methods.magmax import MagMax
from mergelab.merging.methods.model_stock import ModelStock
from mergelab.merging.methods.task_arithmetic import TaskArithmetic
from mergelab.merging.methods.ties import Ties
from mergelab.merging.methods.weight_average import WeightAverage
from mergelab.merging.spec import Method, MethodParams, MethodSpec


class PleasParams(MethodParams):
    """PLeaS takes its settings as ``pleas_merge`` arguments (budget, matching, least squares, ...)."""


PLEAS_SPEC = MethodSpec(
    "pleas",
    "PLeaS: merge two models trained from different inits (partial matching + least squares) at a width budget",
    PleasParams,
    reads="train",
    runs="in_memory",
    min_models=2,
    needs_base=False,
    produces="wider_model",
    run_with="`mergelab bench pleas`; mergelab.pleas.pleas_merge(model_a, model_b, ...)",
)

METHOD_CLASSES: tuple[type[Method], ...] = (
    WeightAverage, TaskArithmetic, Ties, Dare, MagMax, Cart, Consensus, ModelStock,  # streaming, weights only
    FisherMerging, FisherBatchMerging, RegMean, AdaMerging, TallConsensus,  # in memory, read task data
)  # fmt: skip
OTHER_SPECS: tuple[MethodSpec, ...] = (TALL_MASKS_SPEC, NEULIG_SPEC, PLEAS_SPEC)  # not one merged model


def method_specs() -> dict[str, MethodSpec]:
    """Every method's spec, by name: the merges first, then the entries that produce something else."""
    return {spec.name: spec for spec in (*(cls.spec for cls in METHOD_CLASSES), *OTHER_SPECS)}


def list_methods() -> list[MethodSpec]:
    """Every method's spec (``mergelab methods``)."""
    return list(method_specs().values())


def get_method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name lists the known ones."""
    specs = method_specs()
    if name not in specs:
        raise ConfigError(f"unknown merge method '{name}'; choose one of: {', '.join(specs)}")
    return specs[name]


def method_class(name: str) -> type[Method]:
    """The class that runs method ``name`` as one merge; an entry that produces something else names its runner."""
    spec = get_method_spec(name)
    classes = {cls.spec.name: cls for cls in METHOD_CLASSES}
    if name not in classes:
        raise ConfigError(f"'{name}' does not produce one merged model ({spec.produces.replace('_', ' ')}); "
                          f"run it with {spec.run_with}")  # fmt: skip
    return classes[name]


def build_method(name: str, params: Mapping[str, Any] | None, num_models: int) -> Method:
    """Validate ``params`` against the method's declaration and build it for ``num_models`` models."""
    cls = method_class(name)
    return cls(cls.spec.validate(params), num_models)
