"""Task arithmetic: θ = θ₀ + Σ_t λ_t τ_t."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.merging.base import FUSED_CHUNK, MergeMethod, chunk_slices, per_model_values
from mergelab.merging.ops import Scratch, require_base
from mergelab.merging.spec import MethodParams, MethodSpec


class TaskArithmeticParams(MethodParams):
    scale: float | list[float] = Field(
        0.3, description="λ: one value or one per model (negative values negate a task vector)"
    )


class TaskArithmetic(MergeMethod):
    """Task arithmetic (algorithms.md §2).

    Reference: FusionBench ``config/method/task_arithmetic.yaml`` and AdaMerging ``src/main_task_arithmetic.py``
    (λ = 0.3). A per-model λ list is an extension; with one value this is exactly θ₀ + λ Σ_t τ_t.
    ``merge_task_vectors`` is the task-vector part, reused by DARE.
    """

    spec = MethodSpec(
        "task_arithmetic", "Task arithmetic: base plus λ times the sum of the task vectors", TaskArithmeticParams
    )
    params: TaskArithmeticParams
    borrows_inputs = True  # τ_t chunks are computed into scratch buffers: the inputs are only read

    def __init__(self, params: TaskArithmeticParams, num_models: int) -> None:
        super().__init__(params, num_models)
        self.scales = per_model_values(params.scale, num_models, "scale")

    def observe_task_vectors(self, pass_index: int, name: str, taus: Sequence[torch.Tensor]) -> None:
        """No statistics are needed."""

    def merge_task_vectors(self, name: str, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_t λ_t τ_t, accumulated in place in ``taus[0]`` (the method owns its task vectors).

        Bit for bit the sum 0 + λ_0 τ_0 + λ_1 τ_1 + … started from zeros: λ_0 τ_0 rounds once either way, and
        adding +0.0 turns a −0.0 product into +0.0, as 0 + (−0.0) does; no zero tensor is allocated.
        """
        delta = taus[0].mul_(self.scales[0]).add_(0.0)
        for scale, tau in zip(self.scales[1:], taus[1:], strict=True):
            delta.add_(tau, alpha=scale)
        return delta

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        """θ₀ + Σ_t λ_t τ_t into a new tensor, in cache-sized chunks with τ_t in scratch buffers (every step is
        elementwise: the same bits as whole tensors, with the inputs read once and never written)."""
        base = require_base(base, self.name)
        flat_base, flats = base.reshape(-1), [m.reshape(-1) for m in models]
        out, work = flat_base.new_empty(flat_base.numel()), Scratch(min(flat_base.numel(), FUSED_CHUNK), flat_base)
        for s in chunk_slices(flat_base.numel(), FUSED_CHUNK):
            n = s.stop - s.start
            taus = [torch.sub(f[s], flat_base[s], out=work(f"tau{t}", n)) for t, f in enumerate(flats)]
            torch.add(flat_base[s], self.merge_task_vectors(name, taus), out=out[s])
        return out.view(base.shape)
