"""TIES-Merging: trim each task vector to its top-k magnitudes, elect a sign per entry, merge agreeing entries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from pydantic import Field, model_validator

from mergelab.core.errors import MergelabError
from mergelab.merging.base import MergeMethod, chunk_slices, per_model_values
from mergelab.merging.ops import (
    MagnitudeCut,
    Scratch,
    TieBreak,
    bin_bounds,
    bits_to_float,
    disjoint_merge_rows,
    locate_rank,
    magnitude_keep_count,
    majority_sign,
    radix_histogram,
    require_base,
    scale_rows,
    sign_total_rows,
    split_at_bins,
    task_vectors,
    top_cut,
    trim,
    trim_rank,
)
from mergelab.merging.spec import MethodParams, MethodSpec

Scope = Literal["global", "per_tensor"]
Disjoint = Literal["sum", "mean"]

_HIGH_PASS, _LOW_PASS, _SIGN_PASS = 0, 1, 2


PARALLEL_MIN = 1 << 20  # entries per tensor from which the T per-tensor selections run in parallel threads
DEFER_BYTES = 1 << 28  # τ values global TIES may hold between passes 1 and its end (else a third pass runs)
MERGE_CHUNK = 1 << 20  # entries per chunk of the fused trim-elect-merge loop (4 MB of float32: stays in cache)


def chunk_scratch(flat: torch.Tensor) -> Scratch:
    """Buffers for one tensor's fused chunk loop (chunks of at most ``MERGE_CHUNK`` entries)."""
    return Scratch(min(flat.numel(), MERGE_CHUNK), flat)


def per_tensor_cuts(flats: Sequence[torch.Tensor], count: int, tie_break: TieBreak) -> list[MagnitudeCut]:
    """:func:`~mergelab.merging.ops.top_cut` of every τ_t, in parallel threads for large tensors (the radix passes, and the CPU
    argsort of ``tie_break="argsort"``, release the GIL); errors propagate.

    Measured with ``"argsort"`` at 3.2 GB (base + 3, 2 cores, ties straddling the cut in many tensors): 156 s and
    4.36 GB peak RSS in threads against 231 s and 2.94 GB one τ_t at a time (an int64 index per entry per sort)."""
    if len(flats) < 2 or flats[0].numel() < PARALLEL_MIN:
        return [top_cut(f, count, tie_break) for f in flats]
    with ThreadPoolExecutor(max_workers=min(len(flats), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda f: top_cut(f, count, tie_break), flats))


class DeferredColumns:
    """``[T, m]`` columns appended into one buffer allocated once at its bound (pages are touched only as they fill):
    many small long-lived tensors fragment the heap, which held 2 GB of peak RSS in a 3.2 GB global TIES merge."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.buffer, self.count = torch.empty(rows, capacity), 0

    def append(self, columns: torch.Tensor) -> None:
        width = columns.shape[1]
        if self.count + width > self.buffer.shape[1]:
            raise MergelabError(f"TIES deferred {self.count + width} positions, more than the bound {self.buffer.shape[1]}")
        self.buffer[:, self.count : self.count + width] = columns
        self.count += width

    def values(self) -> torch.Tensor:
        return self.buffer[:, : self.count]


class TiesParams(MethodParams):
    density: float = Field(0.2, ge=0.0, le=1.0, description="fraction of each task vector's largest |τ| kept")
    scope: Scope = Field(
        "global",
        description="global: |τ| ≥ κ over all merged parameters (paper, FusionBench); per_tensor: exactly "
        "max(1, int(density·n)) per tensor, ties to +, λ before the election (mergekit 0.1.5 ties)",
    )
    disjoint: Disjoint = Field(
        "sum", description="sum or mean of the sign-agreeing entries ('mean' needs λ≈1, 'sum' λ≈0.3)"
    )
    scale: float | list[float] = Field(0.3, description="λ: one value or one per model, applied before the election")
    tie_break: TieBreak = Field(
        "index", description="per_tensor: which of the entries tied with the smallest kept |τ| are kept where they "
        "straddle the cut: 'index' (lowest index first, O(n)) or 'argsort' (mergekit's torch.argsort order, bit for "
        "bit, O(n log n)); global keeps every tie"
    )

    @model_validator(mode="after")
    def _tie_break_per_tensor(self) -> TiesParams:
        if self.tie_break != "index" and self.scope == "global":
            raise ValueError("tie_break applies to scope='per_tensor' (the global scope keeps every entry tied with "
                             "κ); drop tie_break or set scope: per_tensor")  # fmt: skip
        return self


class Ties(MergeMethod):
    """TIES-Merging (algorithms.md §3): θ = θ₀ + merge(λ_t · trim(τ_t)).

    Reference: prateeky2806/ties-merging ``src/utils/merge_utils.py``; defaults (keep 20%, dis-sum, λ = 0.3) as
    FusionBench ``config/method/ties_merging.yaml`` and AdaMerging ``src/main_ties_merging.py``. The official
    README setting is dis-mean with λ ≈ 1 (swept 0.8-2.5): "mean" needs a λ about |A_p| times larger than "sum".

    ``scope="global"`` is FusionBench's ``ties_merging`` (``ties_merging_utils.py``), to float rounding:

    * Trim: κ_t = the (P − ⌊density·P⌋)-th smallest |τ_t| (1-indexed) over every merged tensor, keep
      |τ_t| ≥ κ_t: ⌊dP⌋ + 1 entries barring ties, and every entry tied with κ_t; keep all when that rank is
      below 1 (density 1). Exact and streamed: statistics pass 0 histograms the high 16 bits of the float32
      patterns of |τ_t|, pass 1 the low 16 bits inside the selected bin, pass 2 sums the elected signs.
    * Elect: γ = sign(Σ_t τ̂_t); γ = 0 entries get the majority sign sign(Σ_p γ_p) over all merged tensors.
      One λ for all models is factored out (θ₀ + λ τ_m, as the reference); distinct per-model λ_t (an
      extension) scale τ̂_t before the election.

    ``scope="per_tensor"`` is mergekit 0.1.5's ``ties`` (``merge_methods/generalized_task_arithmetic.py``
    ``merge_group`` with ``sparsify.magnitude`` and ``get_mask(method="sum")``), bit for bit with
    ``normalize: false`` / ``disjoint="sum"`` and ``weight`` λ_t (with ``tie_break="argsort"``):

    * Trim: each tensor of each τ_t keeps exactly max(1, int(density·n)) entries of largest |τ| (all for
      density 1, none for density 0), by an O(n) radix select. Where entries tied with the smallest kept |τ|
      straddle the cut (rare in small float32 tensors, common in large ones: τ is a difference of floats, a
      multiple of ulp(θ₀); and in bf16 checkpoints), ``tie_break`` names which are kept: ``"index"`` (default)
      the lowest indices, as a stable descending sort, in O(n); ``"argsort"`` the ones
      ``torch.argsort(|τ|, descending=True)`` puts first, as mergekit (CPU argsort is unstable and no index rule
      reproduces it, so that tensor is sorted: mergekit's own O(n log n) cost). The two differ only in which
      equal-magnitude entries are kept, never in how many or in their magnitude; ``"argsort"`` is mergekit bit
      for bit.
    * Elect: τ̂_t is multiplied by λ_t first (mergekit's per-model ``weight``), then γ = +1 where
      Σ_t λ_t τ̂_t ≥ 0 and −1 elsewhere (zero sums go to +, not to a majority).

    Disjoint merge, both scopes: over the non-zero entries agreeing with γ, the sum, or the mean over
    max(count, 1). Per tensor, "mean" equals mergekit's ``normalize: true`` with equal weights.
    """

    spec = MethodSpec("ties", "TIES-Merging: trim to top-k, elect signs, merge sign-agreeing entries", TiesParams)
    params: TiesParams

    def __init__(self, params: TiesParams, num_models: int) -> None:
        super().__init__(params, num_models)
        self.scales = per_model_values(params.scale, num_models, "scale")
        # Global: one λ for all models is factored out (θ₀ + λ τ_m exactly as FusionBench, no rounding in the
        # election); distinct per-model λ_t scale the trimmed rows before the election. Per tensor: always
        # before the election, as mergekit's per-model weights.
        uniform = len(set(self.scales)) == 1 and params.scope == "global"
        self._row_scales = None if uniform else self.scales
        self._outer_scale = self.scales[0] if uniform else 1.0
        self._num_entries = 0
        self._high_hist: torch.Tensor | None = None
        self._high_bins: torch.Tensor | None = None
        self._low_ranks: torch.Tensor | None = None
        self._low_hist: torch.Tensor | None = None
        self._thresholds: torch.Tensor | None = None
        self._sign_total = 0
        self._majority: float | None = None
        self._fused = False  # the sign statistics ride on pass 1 (decided when pass 0 ends)
        self._deferred: DeferredColumns | None = None

    def num_stat_passes(self) -> int:
        return 3 if self.params.scope == "global" else 0

    def pass_needed(self, pass_index: int) -> bool:
        """The separate sign pass runs only where pass 1 could not carry it (see :meth:`end_pass`)."""
        return not (pass_index == _SIGN_PASS and self._fused)

    # -- engine interface -------------------------------------------------------------------------------------

    def observe(self, pass_index: int, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> None:
        self.observe_task_vectors(pass_index, name, task_vectors(require_base(base, self.name), models, in_place=True))

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        base = require_base(base, self.name)
        return base.add_(self.merge_task_vectors(name, task_vectors(base, models, in_place=True)))

    # -- task-vector interface (reused by DARE) ---------------------------------------------------------------

    def observe_task_vectors(self, pass_index: int, name: str, taus: Sequence[torch.Tensor]) -> None:
        """Accumulate the global statistics of one tensor's task vectors (global scope only), chunk by chunk."""
        if self.params.scope != "global":
            return
        flats = [t.reshape(-1) for t in taus]
        slices = chunk_slices(flats[0].numel())
        if pass_index == _HIGH_PASS:
            self._num_entries += flats[0].numel()
            hist = sum(radix_histogram([f[s] for f in flats]) for s in slices)
            self._high_hist = hist if self._high_hist is None else self._high_hist + hist
        elif pass_index == _LOW_PASS and self._fused:
            self._observe_low_and_signs(flats)
        elif pass_index == _LOW_PASS:
            if self._high_bins is not None:
                hist = sum(radix_histogram([f[s] for f in flats], self._high_bins) for s in slices)
                self._low_hist = hist if self._low_hist is None else self._low_hist + hist
        elif pass_index == _SIGN_PASS and not self._fused:
            self._observe_signs(flats)

    def _observe_signs(self, flats: Sequence[torch.Tensor]) -> None:
        cuts, work = self._global_cuts(), chunk_scratch(flats[0])
        for s in chunk_slices(flats[0].numel(), MERGE_CHUNK):
            self._sign_total += sign_total_rows(self._trimmed_rows(flats, cuts, s, work), work)

    def _observe_low_and_signs(self, flats: Sequence[torch.Tensor]) -> None:
        """Pass 1 carrying the sign statistics: exact where the trim is already certain, deferred elsewhere."""
        if self._high_bins is None:  # every entry kept: κ = 0 is known, the signs are exact now
            self._observe_signs(flats)
            return
        lo, hi = bin_bounds(self._high_bins)
        work = chunk_scratch(flats[0])
        for s in chunk_slices(flats[0].numel(), MERGE_CHUNK):
            split = split_at_bins([f[s] for f in flats], lo, hi, self._row_scales, work)
            self._low_hist = split.low_hist if self._low_hist is None else self._low_hist + split.low_hist
            self._sign_total += split.sign_total
            if split.deferred.shape[1] and self._deferred is not None:
                self._deferred.append(split.deferred)

    def end_pass(self, pass_index: int) -> None:
        if self.params.scope != "global":
            return
        if pass_index == _HIGH_PASS:
            k = trim_rank(self._num_entries, self.params.density)
            if k < 1 or self._high_hist is None:
                self._thresholds = torch.zeros(self.num_models)
            else:
                ranks = torch.full((self.num_models,), k, dtype=torch.int64)
                self._high_bins, self._low_ranks = locate_rank(self._high_hist, ranks)
            self._fused = self._deferral_fits()
            self._high_hist = None
        elif pass_index == _LOW_PASS:
            if self._thresholds is None:
                if self._low_hist is None or self._high_bins is None or self._low_ranks is None:
                    raise MergelabError("TIES statistics pass 1 saw no tensor; stream every tensor in each pass")
                low_bins, _ = locate_rank(self._low_hist, self._low_ranks)
                self._thresholds = bits_to_float(self._high_bins, low_bins)
            self._low_hist = None
            if self._fused:
                self._settle_deferred()
        elif pass_index == _SIGN_PASS and not self._fused:
            self._majority = majority_sign(self._sign_total)

    def _deferral_fits(self) -> bool:
        """Whether pass 1 can carry the sign statistics: the τ values it must hold until κ is known (at most every
        entry in a threshold's high bin, T values each) fit in ``DEFER_BYTES``; else a third pass runs."""
        if self._high_bins is None:
            return True
        in_bins = int(self._high_hist.gather(1, self._high_bins.unsqueeze(1)).sum())  # type: ignore[union-attr]
        if in_bins * self.num_models * 4 > DEFER_BYTES:
            return False
        self._deferred = DeferredColumns(self.num_models, in_bins)  # positions touched ≤ entries in the bins
        return True

    def _settle_deferred(self) -> None:
        """The sign statistics of the deferred positions, now that κ is exact; then the majority sign."""
        thresholds = self._global_thresholds()
        values = self._deferred.values() if self._deferred is not None else torch.zeros(self.num_models, 0)
        for s in chunk_slices(values.shape[1], MERGE_CHUNK):
            trimmed = trim(values[:, s], thresholds)
            self._sign_total += sign_total_rows(list(trimmed if self._row_scales is None
                                                     else scale_rows(trimmed, self._row_scales)))  # fmt: skip
        self._deferred = None
        self._majority = majority_sign(self._sign_total)

    def merge_task_vectors(self, name: str, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """τ_m for one tensor (already scaled by λ): trim, elect and merge fused chunk by chunk (cache-sized chunks,
        no stacked copies), in place on the method's own τ_t."""
        flats = [t.reshape(-1) for t in taus]
        numel = flats[0].numel()
        if self.params.scope == "global":
            if self._majority is None:
                raise MergelabError(
                    "TIES with scope='global' needs its 3 statistics passes over every tensor before merging"
                )
            cuts, majority = self._global_cuts(), self._majority
        else:
            count = magnitude_keep_count(numel, self.params.density)
            cuts, majority = per_tensor_cuts(flats, count, self.params.tie_break), 1.0  # mergekit: γ = + where Σ ≥ 0
        merged, work = torch.empty(numel, dtype=flats[0].dtype, device=flats[0].device), chunk_scratch(flats[0])
        for s in chunk_slices(numel, MERGE_CHUNK):
            rows = self._trimmed_rows(flats, cuts, s, work)
            disjoint_merge_rows(rows, majority, self.params.disjoint, out=merged[s], scratch=work)
        merged = merged.reshape(taus[0].shape)
        return merged if self._row_scales is not None else merged.mul_(self._outer_scale)

    @property
    def thresholds(self) -> torch.Tensor | None:
        """The global κ_t per model once statistics pass 1 has ended (None before, or for per-tensor scope)."""
        return self._thresholds

    def _global_thresholds(self) -> torch.Tensor:
        if self._thresholds is None:
            raise MergelabError("TIES global thresholds are unknown: run statistics passes 0 and 1 first")
        return self._thresholds

    def _global_cuts(self) -> list[MagnitudeCut]:
        """Keep |τ_t| ≥ κ_t (every tie) for each model."""
        return [MagnitudeCut(kappa) for kappa in self._global_thresholds()]

    def _trimmed_rows(self, flats: Sequence[torch.Tensor], cuts: Sequence[MagnitudeCut], s: slice,
                      work: Scratch) -> list[torch.Tensor]:  # fmt: skip
        """The chunk ``s`` of every τ_t trimmed in place (and scaled by its λ_t when the λ_t differ)."""
        rows = [cut.trim_(f[s], work) for f, cut in zip(flats, cuts, strict=True)]
        if self._row_scales is None:
            return rows
        return [row.mul_(scale) for row, scale in zip(rows, self._row_scales, strict=True)]
