"""``mergelab.merge``: the one entry point for every merging method, weight-space or data-dependent.

The method's spec decides the route: ``"streaming"`` methods go through the streaming engine
(``mergelab.merging.api.merge_streaming``, one tensor at a time, any checkpoint size), ``"in_memory"`` ones read each
task's data and merge whole small models (``mergelab.learned.api.merge_with_data``). Callers never branch on the
kind of method; ``merge_experts`` is the form for callers that hold every task's data anyway (the benchmark).

``device`` goes to either route: the in-memory one runs the models there (default ``"auto"``, the CPU on a CPU-only
machine), the streaming engine does its arithmetic there (default None: on the CPU, as the readers and writer are).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.api.registry import build_method, get_method_spec, list_methods
from mergelab.core.device import DeviceLike
from mergelab.core.errors import ConfigError
from mergelab.data.types import TextTask
from mergelab.learned.api import info_as_json, merge_with_data
from mergelab.learned.base import DataMergeMethod
from mergelab.merging.api import Source, merge_streaming
from mergelab.merging.base import MergeMethod
from mergelab.merging.engine import ProgressCallback
from mergelab.merging.selection import DEFAULT_EXCLUDE
from mergelab.merging.spec import MethodSpec, Reads

PathLike = str | os.PathLike[str]
DataSource = TextTask | PathLike
STREAMING_OPTIONS = ("include", "exclude", "dtype", "max_shard_size", "allow_nonfinite")
DATA_OPTIONS = ("max_length", "batch_size", "seed", "memo", "device")


@dataclass(frozen=True)
class MergeResult:
    """What ``mergelab.merge`` made: the merged ``state`` (``out=None``) or the ``path`` it was written to, the
    method, what it read, whether it is transductive, and ``info``: what it learned or chose (empty for the
    weight-space methods; coefficients, λ_t, kept fraction, ... for the data-dependent ones)."""

    method: str
    state: dict[str, torch.Tensor] | None
    path: Path | None
    reads: Reads
    transductive: bool
    info: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """``info`` as JSON values with the method, the split it read and whether it is transductive (the benchmark
        report's "learned" table); empty when the method learned nothing."""
        if not self.info:
            return {}
        return info_as_json(
            {**self.info, "method": self.method, "split": self.reads, "transductive": self.transductive}
        )


def merge(
    method: str,
    base: Source | None,
    models: Mapping[str, Source] | Sequence[Source],
    *,
    data: Mapping[str, DataSource] | Sequence[DataSource] | None = None,
    out: PathLike | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    allow_nonfinite: bool = False,
    max_length: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    memo: dict[Any, Any] | None = None,
    device: DeviceLike | None = None,
    **params: Any,
) -> MergeResult:
    """Merge ``models`` (fine-tunes of ``base``) with ``method`` (see ``list_methods()``) and its ``params``.

    ``models``: task name → HF folder, weight file, in-memory state dict or reader (a weight-space method also takes
    PEFT LoRA adapter folders, applied to ``base`` or to their own local base when ``base`` is None). A plain list is
    named ``task0``, ``task1``, ... in order. ``data``: the same task names → ``TextTask`` or data folder (a list
    pairs by order), required by the data-dependent methods (each reads the split its spec declares) and refused by
    the weight-space ones. With ``out=None`` the result holds the merged state dict (base layout), otherwise it is
    written atomically to ``out`` (sharded safetensors plus the base's config and tokenizer files).

    Options (keyword-only): ``force`` (replace ``out``), ``progress(phase, done, total)``; streaming methods only:
    ``include`` / ``exclude`` tensor regexes (default: every float tensor but the heads), ``dtype`` of the output,
    ``max_shard_size``, ``allow_nonfinite``; data-dependent methods only: ``max_length`` (tokens per input, 64),
    ``batch_size`` (tokenisation batch, 32), ``seed`` (input sampling, 0), ``memo`` (a dict kept across calls on the
    same models and data; it caches what does not depend on every parameter), ``device`` (where the models run:
    ``"auto"`` when unset, i.e. CUDA, else MPS, else the CPU; the merged state comes back on the CPU). A method that
    declares a parameter
    named ``seed`` or ``batch_size`` (DARE, AdaMerging) receives the value as that parameter. Everything else in
    ``**params`` is a method parameter, validated against the method's ``Params``.
    """
    spec = get_method_spec(method)
    options = {"include": include, "exclude": exclude, "dtype": dtype, "max_shard_size": max_shard_size,
               "allow_nonfinite": allow_nonfinite, "max_length": max_length, "batch_size": batch_size, "seed": seed,
               "memo": memo, "device": device}  # fmt: skip
    params, options = route_options(spec, params, options)
    named = name_models(models)
    built = build_method(method, params, len(named))
    route = _merge_streaming if isinstance(built, MergeMethod) else _merge_in_memory
    result = route(built, base, named, data, out, force, progress, options)  # type: ignore[arg-type]
    state, path = (None, result) if isinstance(result, Path) else (result, None)
    return MergeResult(spec.name, state, path, spec.reads, spec.transductive, dict(built.info))


def merge_experts(
    method: str,
    base: PathLike,
    experts: Mapping[str, PathLike],
    tasks: Mapping[str, DataSource],
    *,
    max_length: int | None = None,
    memo: dict[Any, Any] | None = None,
    device: DeviceLike | None = None,
    **params: Any,
) -> MergeResult:
    """``merge`` for callers that hold every expert's task (the benchmark): a method that reads data gets ``tasks``
    and the reading options (and ``device``), a weight-space method merges the weights only (on ``device`` once the
    streaming engine takes one)."""
    if not get_method_spec(method).reads_data:
        return merge(method, base, experts, device=device, **params)
    return merge(method, base, experts, data=tasks, max_length=max_length, memo=memo, device=device, **params)


def route_options(
    spec: MethodSpec, params: dict[str, Any], options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method parameters, route options): ``seed`` / ``batch_size`` go to a method that declares them; an option
    given to a route that does not use it is an error naming it."""
    params, options = dict(params), dict(options)
    for key in ("seed", "batch_size"):
        if key in spec.params.model_fields and options.get(key) is not None:
            params[key] = options.pop(key)
    given = [key for key, value in options.items() if value is not None and value is not False]
    unused, why = (STREAMING_OPTIONS, "it reads task data and runs in memory") if spec.reads_data else (
        tuple(k for k in DATA_OPTIONS if k != "device"), "it merges weights only")  # fmt: skip
    wrong = [key for key in given if key in unused]
    if wrong:
        raise ConfigError(f"option(s) {', '.join(wrong)} do not apply to method '{spec.name}': {why}")
    return params, {key: options[key] for key in given}


def name_models(models: Mapping[str, Source] | Sequence[Source]) -> dict[str, Source]:
    """``models`` as task name → source (a list is named ``task0``, ``task1``, ... in order)."""
    if isinstance(models, (str, os.PathLike)) or (
        isinstance(models, Mapping) and any(isinstance(v, torch.Tensor) for v in models.values())
    ):
        raise ConfigError("models must be a list of checkpoints or a mapping task name → checkpoint; "
                          "put a single checkpoint or state dict in a list")  # fmt: skip
    if isinstance(models, Mapping):
        return dict(models)
    return {f"task{index}": model for index, model in enumerate(models)}


def name_data(data: Mapping[str, DataSource] | Sequence[DataSource], num_models: int) -> dict[str, DataSource]:
    """``data`` as task name → data (a list pairs with the models by order: ``task0``, ``task1``, ...)."""
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, (str, os.PathLike, TextTask)) or len(data) != num_models:
        count = 1 if isinstance(data, (str, os.PathLike, TextTask)) else len(data)
        raise ConfigError(f"give one data entry per model ({num_models} models, {count} data), or name both "
                          "by task: models={task: checkpoint}, data={task: data}")  # fmt: skip
    return {f"task{index}": entry for index, entry in enumerate(data)}


def _merge_streaming(
    method: MergeMethod,
    base: Source | None,
    models: dict[str, Source],
    data: Mapping[str, DataSource] | Sequence[DataSource] | None,
    out: PathLike | None,
    force: bool,
    progress: ProgressCallback | None,
    options: dict[str, Any],
) -> dict[str, torch.Tensor] | Path:
    """The weight-space route: the streaming engine over any checkpoints, no data."""
    if data is not None:
        raise ConfigError(f"method '{method.name}' merges weights only; data= is only for data-dependent methods "
                          f"({', '.join(s.name for s in list_methods() if s.reads_data)})")  # fmt: skip
    include, exclude = options.get("include"), options.get("exclude")
    return merge_streaming(method, base, list(models.values()), out, force=force, progress=progress,
                           include=(r".*",) if include is None else include,
                           exclude=DEFAULT_EXCLUDE if exclude is None else exclude, dtype=options.get("dtype"),
                           max_shard_size=options.get("max_shard_size") or "2GB",
                           allow_nonfinite=bool(options.get("allow_nonfinite")),
                           device=options.get("device"))  # fmt: skip


def _merge_in_memory(
    method: DataMergeMethod,
    base: Source | None,
    models: dict[str, Source],
    data: Mapping[str, DataSource] | Sequence[DataSource] | None,
    out: PathLike | None,
    force: bool,
    progress: ProgressCallback | None,
    options: dict[str, Any],
) -> dict[str, torch.Tensor] | Path:
    """The data-dependent route: checkpoint folders, each with its task's data."""
    name = method.name
    if data is None:
        raise ConfigError(f"method '{name}' reads each task's {method.spec.reads} split: pass data={{task: TextTask "
                          "or data folder}} with one entry per model")  # fmt: skip
    folders = {task: source for task, source in models.items() if isinstance(source, (str, os.PathLike))}
    if not isinstance(base, (str, os.PathLike)) or len(folders) != len(models):
        raise ConfigError(f"method '{name}' runs the models on data: give the base and every model as a Hugging "
                          "Face folder (not a state dict or reader)")  # fmt: skip
    reading = {key: options[key] for key in DATA_OPTIONS if key in options}  # unset: merge_with_data's defaults
    return merge_with_data(method, base, folders, name_data(data, len(models)), out, force=force, progress=progress,
                           **reading)  # fmt: skip
