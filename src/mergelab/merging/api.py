"""The streaming route of ``mergelab.merge``: checkpoints in, one merged checkpoint out, one tensor at a time.

``mergelab.api.merge`` builds the method from the registry and calls :func:`merge_streaming` for methods that run
``"streaming"``; this module knows nothing of method names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from mergelab.core.device import resolve_device
from mergelab.core.errors import ConfigError
from mergelab.io.adapter import shared_base
from mergelab.io.reader import CheckpointReader, open_checkpoint
from mergelab.io.writer import BackgroundWriter, ShardedWriter, atomic_folder, check_target, copy_side_files, parse_size
from mergelab.merging.base import MergeMethod
from mergelab.merging.engine import PREFETCH, MergePlan, ProgressCallback, plan_merge, stream_merge
from mergelab.merging.selection import DEFAULT_EXCLUDE, TensorSelection

Source = str | os.PathLike[str] | Mapping[str, torch.Tensor] | CheckpointReader

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def _open(source: Source, base: CheckpointReader | None = None) -> CheckpointReader:
    if hasattr(source, "keys") and hasattr(source, "get") and hasattr(source, "shape"):
        return source  # already a reader
    return open_checkpoint(source, base=base)  # type: ignore[arg-type]  # base: for LoRA adapter folders


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16'/'fp16'/'fp32' (or a torch dtype) → torch dtype; None keeps each tensor's source dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def merge_streaming(
    method: MergeMethod,
    base: Source | None,
    models: Sequence[Source],
    out: str | os.PathLike[str] | None = None,
    *,
    include: Sequence[str] = (r".*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressCallback | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor] | Path:
    """Merge ``models`` (fine-tunes of ``base``) with the built streaming ``method``.

    ``base`` and ``models`` are HF folders, weight files, in-memory state dicts or readers; a model may also be a
    PEFT LoRA adapter folder, applied to ``base`` (or, with no ``base``, to its own local
    ``base_model_name_or_path``, which then is the base). With ``out=None`` the merged state dict (in the base's
    layout) is returned; otherwise it is written atomically to ``out`` as sharded safetensors plus the base's config
    and tokenizer files, and the path is returned.

    With ``out``, a background thread reads the inputs ahead (at most ``PREFETCH`` tensors queued) and another
    writes the shards, around the arithmetic (memory stays bounded by a few tensors). ``device`` (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"auto"`` or a ``torch.device``)
    runs the method's arithmetic there, one tensor at a time; None or ``"cpu"`` is the CPU.
    """
    out_dtype = parse_dtype(dtype)
    if out is not None:
        check_target(Path(out), force)
    base_reader = _open(base) if base is not None else None
    readers = [_open(m, base_reader) for m in models]
    if base_reader is None:  # LoRA adapters name their base: merge onto it
        base_reader = shared_base(readers)
    plan = plan_merge(base_reader, readers, TensorSelection(tuple(include), tuple(exclude)), out_dtype)
    compute_on = None if device is None else resolve_device(device)
    prefetch = PREFETCH if out is not None else 0  # in memory: one tensor per reader at a time, as before
    stream = stream_merge(method, plan, allow_nonfinite=allow_nonfinite, progress=progress, device=compute_on,
                          prefetch=prefetch)  # fmt: skip
    try:
        return dict(stream) if out is None else _write(stream, plan, Path(out), force, parse_size(max_shard_size))
    finally:
        stream.close()  # stops the reader thread on an error


def _write(stream: Iterator[tuple[str, torch.Tensor]], plan: MergePlan, out: Path, force: bool, max_shard: int) -> Path:
    """Write the stream atomically to ``out`` (a background thread writes while the next tensor is merged)."""
    with atomic_folder(out, force) as tmp:
        writer = BackgroundWriter(ShardedWriter(tmp, plan.output, max_shard))
        try:
            for name, tensor in stream:
                writer.write(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_side_files(plan.reference.config_dir, tmp)
    return out
