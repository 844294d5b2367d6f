"""The streaming merge engine.

For each selected tensor the engine loads the base tensor and the T fine-tuned tensors (as float32), hands them to
the method, casts the result to the output dtype and yields it. A reader thread loads the inputs ahead, at most
``prefetch`` tensors queued plus one being read (``api.merge_streaming`` adds a writer thread holding at most
512 MB of outputs queued, or one output, plus one being written). A method that only reads its inputs
(``borrows_inputs``) gets them mapped from safetensors files rather than copied. Peak memory is about (T + 2) × the
largest tensor inline, plus prefetch + 1 read ahead and the writer's queue: independent of the number of tensors in
the model. Methods with whole-model statistics
first stream all selected tensors through ``observe`` once per statistics pass (inputs are checked for NaN/Inf
the first time they are read; a pass the method no longer needs, ``pass_needed``, is neither read nor observed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mergelab.core.device import CPU
from mergelab.core.errors import CheckpointError
from mergelab.io.alignment import AlignedReader, align
from mergelab.io.formats import borrowed, prefetched
from mergelab.io.reader import CheckpointReader
from mergelab.io.writer import TensorSpec
from mergelab.merging.base import MergeMethod
from mergelab.merging.selection import TensorSelection

ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)
PREFETCH = 2  # input tensors the reader thread may hold queued ahead of the arithmetic


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
    """True when no entry is NaN or ±Inf: a finite sum proves it (NaN and ±Inf propagate); a non-finite sum (which
    an overflow of finite entries can also give) is settled by one min/max reduction. No boolean copy."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _load_float(reader: CheckpointReader, name: str, allow_nonfinite: bool, device: torch.device,
                borrow: bool = False) -> torch.Tensor:  # fmt: skip
    """One input tensor as float32 on ``device`` (moved in its stored dtype, cast there), checked for NaN/Inf;
    ``borrow``: the reader's read-only view where it has one (no copy when already float32 on the CPU)."""
    tensor = borrowed(reader, name) if borrow else reader.get(name)
    if device.type != "cpu":
        tensor = tensor.to(device, non_blocking=False)
    tensor = tensor.to(torch.float32)
    if not allow_nonfinite and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"tensor '{name}' in {reader.path} has {bad} NaN/Inf value(s); fix the checkpoint or pass "
            "--allow-nonfinite to merge anyway"
        )
    return tensor


@dataclass(frozen=True)
class _Load:
    """One tensor the reader thread loads: from ``reader``, as float32 (checked) or as ``dtype`` (copied through)."""

    reader: CheckpointReader
    name: str
    dtype: torch.dtype | None = None  # None: float32 merge input; else an unmerged tensor in its output dtype
    check: bool = True  # check for NaN/Inf (a merge input is checked the first time it is read, not at every pass)
    pass_index: int | None = None  # the statistics pass it is read for (None: the merging pass)


def _schedule(method: MergeMethod, plan: MergePlan) -> Iterator[tuple[int | None, str, list[_Load]]]:
    """(pass index or None for the merging pass, tensor name, its loads) in engine order, statistics passes first."""
    inputs = ([plan.base] if (plan.base is not None and method.spec.needs_base) else []) + list(plan.models)
    passes = method.num_stat_passes()
    for pass_index in range(passes):
        for name in plan.merged_names:
            yield pass_index, name, [_Load(r, name, check=pass_index == 0, pass_index=pass_index) for r in inputs]
    for spec in plan.output:
        merged = spec.name in plan.merged
        yield None, spec.name, [_Load(r, spec.name, check=passes == 0) for r in inputs] if merged else [
            _Load(plan.reference, spec.name, spec.dtype)
        ]


def _loader(method: MergeMethod, allow_nonfinite: bool, device: torch.device) -> Callable[[_Load], torch.Tensor | None]:
    def load(item: _Load) -> torch.Tensor | None:
        if item.pass_index is not None and not method.pass_needed(item.pass_index):
            return None  # a pass the method found unnecessary: not read
        if item.dtype is None:
            return _load_float(item.reader, item.name, allow_nonfinite or not item.check, device, method.borrows_inputs)
        return item.reader.get(item.name).to(item.dtype)

    return load


def _split(loads: list[torch.Tensor], with_base: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    return (loads[0], loads[1:]) if with_base else (None, loads)


def _merged_output(method: MergeMethod, spec: TensorSpec, base, models, allow_nonfinite: bool) -> torch.Tensor:
    result = method.merge_tensor(spec.name, base, models)
    if tuple(result.shape) != spec.shape:
        raise CheckpointError(f"method '{method.name}' returned shape {tuple(result.shape)} for '{spec.name}'")
    if not allow_nonfinite and not all_finite(result):
        raise CheckpointError(f"method '{method.name}' produced NaN/Inf in '{spec.name}'")
    return result.to(spec.dtype)


def stream_merge(
    method: MergeMethod,
    plan: MergePlan,
    allow_nonfinite: bool = False,
    progress: ProgressCallback | None = None,
    device: torch.device | None = None,
    prefetch: int = PREFETCH,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every output tensor in plan order, merging the selected ones.

    A reader thread loads the inputs ahead of the arithmetic, at most ``prefetch`` tensors queued plus one being
    read (``prefetch=0``: no thread, everything inline). The method's arithmetic runs on ``device`` (None: the CPU,
    today's path); yielded tensors are always on the CPU.
    """
    if method.spec.needs_base and plan.base is None:
        raise CheckpointError(f"method '{method.name}' needs the pretrained base checkpoint; pass --base")
    device = CPU if device is None else device
    with_base = plan.base is not None and method.spec.needs_base
    names, passes = plan.merged_names, method.num_stat_passes()
    total = len(names) * passes + len(plan.output)
    specs = {s.name: s for s in plan.output}
    schedule = list(_schedule(method, plan))
    groups = prefetched([loads for _, _, loads in schedule], _loader(method, allow_nonfinite, device), prefetch)
    try:
        for done, (pass_index, name, _) in enumerate(schedule, start=1):
            loaded = next(groups)  # not zip(): its reused result tuple would keep the previous inputs alive
            if pass_index is not None:
                if method.pass_needed(pass_index):  # False only ever after True: the reader skipped no needed load
                    method.observe(pass_index, name, *_split(loaded, with_base))
                del loaded
                if progress:
                    progress(f"statistics pass {pass_index + 1}/{passes}", done, total)
                if done == len(names) * (pass_index + 1):
                    method.end_pass(pass_index)
                continue
            if name in plan.merged:
                tensor = _merged_output(method, specs[name], *_split(loaded, with_base), allow_nonfinite)
            else:
                tensor = loaded[0]
            del loaded
            if progress:
                progress("merging", done, total)
            yield name, tensor.cpu()
    finally:
        groups.close()
