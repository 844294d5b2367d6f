"""The streaming merge engine.

For each selected tensor the engine loads the base tensor and the T fine-tuned tensors (as float32), hands them to
the method, casts the result to the output dtype and yields it. Peak memory is about (T + 2) × the largest tensor
(T + 1 inputs and one output, plus transient casts), independent of the number of tensors in the model. Methods
with whole-model statistics first stream all selected tensors through ``observe`` once per statistics pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mergelab.core.errors import CheckpointError
from mergelab.io.alignment import AlignedReader, align
from mergelab.io.reader import CheckpointReader
from mergelab.io.writer import TensorSpec
from mergelab.merging.base import MergeMethod
from mergelab.merging.selection import TensorSelection

ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class MergePlan:
    """What the engine will do: the output tensors in order, which of them merge, and where the rest come from."""

    reference: CheckpointReader
    models: list[AlignedReader]
    base: CheckpointReader | None
    output: list[TensorSpec]
    merged: set[str]
    ignored_model_keys: dict[str, list[str]] = field(default_factory=dict)

    @property
    def merged_names(self) -> list[str]:
        return [s.name for s in self.output if s.name in self.merged]


def plan_merge(
    base: CheckpointReader | None,
    models: Sequence[CheckpointReader],
    selection: TensorSelection,
    out_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Check every model has every selected tensor with the reference's shape, and fix the output layout."""
    if not models:
        raise CheckpointError("no fine-tuned models given; pass at least one --model")
    reference = base if base is not None else models[0]
    aligned = [align(reference, m) for m in models]
    output: list[TensorSpec] = []
    merged: set[str] = set()
    for name in reference.keys():
        dtype = reference.dtype(name)
        shape = reference.shape(name)
        if selection.merges(name, dtype):
            for model in aligned:
                if name not in model:
                    raise CheckpointError(
                        f"tensor '{name}' (from {reference.path}) is missing in {model.path} "
                        f"(key mapping: {model.mapping.describe()}); exclude it with --exclude or fix the checkpoint"
                    )
                if model.shape(name) != shape:
                    raise CheckpointError(
                        f"tensor '{name}' has shape {list(shape)} in {reference.path} but "
                        f"{list(model.shape(name))} in {model.path}; the checkpoints are not fine-tunes of one model"
                    )
            merged.add(name)
        target_dtype = out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype
        output.append(TensorSpec(name, shape, target_dtype))
    if not merged:
        raise CheckpointError("no tensor was selected for merging; check --include/--exclude patterns")
    reference_keys = set(reference.keys())
    ignored: dict[str, list[str]] = {}
    for model in aligned:
        extra = model.unmapped_keys() + [model.source_name(k) for k in model.keys() if k not in reference_keys]
        if extra:
            ignored[model.path] = extra
    return MergePlan(reference, aligned, base, output, merged, ignored)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf: one min/max reduction (NaN propagates), no boolean copy."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _load_float(reader: CheckpointReader, name: str, allow_nonfinite: bool) -> torch.Tensor:
    tensor = reader.get(name).to(torch.float32)
    if not allow_nonfinite and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"tensor '{name}' in {reader.path} has {bad} NaN/Inf value(s); fix the checkpoint or pass "
            "--allow-nonfinite to merge anyway"
        )
    return tensor


def _inputs(plan: MergePlan, method: MergeMethod, name: str, allow_nonfinite: bool):
    base = _load_float(plan.base, name, allow_nonfinite) if (plan.base is not None and method.spec.needs_base) else None
    models = [_load_float(m, name, allow_nonfinite) for m in plan.models]
    return base, models


def stream_merge(
    method: MergeMethod,
    plan: MergePlan,
    allow_nonfinite: bool = False,
    progress: ProgressCallback | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every output tensor in plan order, merging the selected ones."""
    if method.spec.needs_base and plan.base is None:
        raise CheckpointError(f"method '{method.name}' needs the pretrained base checkpoint; pass --base")
    names = plan.merged_names
    passes = method.num_stat_passes()
    total = len(names) * passes + len(plan.output)
    done = 0
    for pass_index in range(passes):
        for name in names:
            base, models = _inputs(plan, method, name, allow_nonfinite)
            method.observe(pass_index, name, base, models)
            del base, models
            done += 1
            if progress:
                progress(f"statistics pass {pass_index + 1}/{passes}", done, total)
        method.end_pass(pass_index)
    for spec in plan.output:
        if spec.name in plan.merged:
            base, models = _inputs(plan, method, spec.name, allow_nonfinite)
            result = method.merge_tensor(spec.name, base, models)
            del base, models
            if tuple(result.shape) != spec.shape:
                raise CheckpointError(f"method '{method.name}' returned shape {tuple(result.shape)} for '{spec.name}'")
            if not allow_nonfinite and not all_finite(result):
                raise CheckpointError(f"method '{method.name}' produced NaN/Inf in '{spec.name}'")
            tensor = result.to(spec.dtype)
        else:
            tensor = plan.reference.get(spec.name).to(spec.dtype)
        done += 1
        if progress:
            progress("merging", done, total)
        yield spec.name, tensor
