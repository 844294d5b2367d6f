"""The contract of the streaming (weight-space) merging methods.

A method sees one tensor at a time (the base tensor and the T fine-tuned tensors, all float32, same shape)
and returns the merged tensor. Methods that need whole-model statistics (e.g. TIES with a global top-k)
declare ``num_stat_passes() > 0``: the engine then streams every selected tensor through ``observe`` once
per pass (calling ``end_pass`` after each) before the merging pass. Nothing here holds a whole model.

The tensors handed to ``observe`` and ``merge_tensor`` are fresh float32 copies owned by the method: it may
overwrite them in place (e.g. turn θ_t into τ_t with ``task_vectors(..., in_place=True)``) to keep peak memory near
(T + 2) tensors, and it works on large tensors in chunks (``CHUNK`` entries) so that temporaries stay small. A
method that only reads them declares ``borrows_inputs = True``: it is then handed the checkpoint's float32 tensors
mapped from their files where it can be (no copy), and must never write into them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from mergelab.core.errors import ConfigError
from mergelab.merging.spec import Method

CHUNK = 1 << 22  # entries per chunk for elementwise work on large tensors (16 MB of float32)
FUSED_CHUNK = 1 << 18  # entries per chunk where several elementwise steps run in a row (1 MB: stays in cache)


def chunk_slices(numel: int, chunk: int = CHUNK) -> list[slice]:
    """Consecutive slices covering ``range(numel)`` in pieces of at most ``chunk`` entries."""
    return [slice(start, min(start + chunk, numel)) for start in range(0, numel, chunk)] or [slice(0, 0)]


class MergeMethod(Method, ABC):
    """A streaming method: its ``spec`` (``runs="streaming"``, ``reads="nothing"``) declares it; ``merge_tensor``
    does the maths per tensor."""

    borrows_inputs: ClassVar[bool] = False  # True: never writes into its inputs, which may then be mapped read-only

    def num_stat_passes(self) -> int:
        """How many statistics passes over all tensors the method needs before merging (default 0)."""
        return 0

    def pass_needed(self, pass_index: int) -> bool:
        """Whether statistics pass ``pass_index`` still has to run, asked once the earlier passes have ended (a
        method may find a later pass unnecessary; the engine then neither reads nor observes it). Default True."""
        return True

    def observe(self, pass_index: int, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> None:
        """Accumulate whole-model statistics from one tensor during statistics pass ``pass_index``."""

    def end_pass(self, pass_index: int) -> None:
        """Finish statistics pass ``pass_index`` (e.g. turn a histogram into a threshold)."""

    @abstractmethod
    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the merged float32 tensor for ``name`` given the base and the T fine-tuned tensors."""


def per_model_values(value: float | Sequence[float], num_models: int, what: str) -> list[float]:
    """Broadcast a scalar or check a per-model list has exactly ``num_models`` entries."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_models
    values = [float(v) for v in value]
    if len(values) != num_models:
        raise ConfigError(f"'{what}' has {len(values)} values but there are {num_models} models; give one per model")
    return values
