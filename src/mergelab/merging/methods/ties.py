"""TIES-Merging: trim each task vector to its top-k magnitudes, elect a sign per entry, merge agreeing entries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from pydantic import Field

from mergelab.core.errors import MergelabError
from mergelab.merging.base import MergeMethod, chunk_slices, per_model_values
from mergelab.merging.ops import (
    bits_to_float,
    disjoint_merge,
    elect_signs,
    keep_top_magnitudes_,
    locate_rank,
    magnitude_keep_count,
    majority_sign,
    radix_histogram,
    require_base,
    resolve_zero_signs,
    scale_rows,
    sign_total,
    task_vectors,
    trim,
    trim_rank,
)
from mergelab.merging.spec import MethodParams, MethodSpec

Scope = Literal["global", "per_tensor"]
Disjoint = Literal["sum", "mean"]

_HIGH_PASS, _LOW_PASS, _SIGN_PASS = 0, 1, 2


PARALLEL_MIN = 1 << 20  # entries per tensor from which the T per-tensor selections run in parallel threads


def keep_top_each_(flats: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """:func:`keep_top_magnitudes_` on every τ_t, in parallel threads for large tensors (the selections, and the
    single-threaded CPU argsort used where ties straddle the cut, release the GIL); errors propagate.

    Measured at 3.2 GB (base + 3, 2 cores, ties straddling the cut in many tensors): 156 s and 4.36 GB peak RSS in
    threads against 231 s and 2.94 GB one τ_t at a time; each running argsort holds an int64 index per entry."""
    if len(flats) < 2 or flats[0].numel() < PARALLEL_MIN:
        return [keep_top_magnitudes_(f, count) for f in flats]
    with ThreadPoolExecutor(max_workers=min(len(flats), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda f: keep_top_magnitudes_(f, count), flats))


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
    ``normalize: false`` / ``disjoint="sum"`` and ``weight`` λ_t:

    * Trim: each tensor of each τ_t keeps exactly max(1, int(density·n)) entries of largest |τ| (all for
      density 1, none for density 0). The selection is an O(n) radix select. Where entries tied with the
      smallest kept |τ| straddle the cut, the kept ones are those ``torch.argsort(|τ|, descending=True)``
      puts first, as mergekit: CPU argsort is unstable and no index rule reproduces it, so that tensor is sorted
      (mergekit's own cost). Such ties are rare in small float32 tensors but common in large ones (τ is a
      difference of floats, a multiple of ulp(θ₀)) and in bf16 checkpoints.
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

    def num_stat_passes(self) -> int:
        return 3 if self.params.scope == "global" else 0

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
        elif pass_index == _LOW_PASS:
            if self._high_bins is not None:  # None: every entry is kept, no threshold to refine
                hist = sum(radix_histogram([f[s] for f in flats], self._high_bins) for s in slices)
                self._low_hist = hist if self._low_hist is None else self._low_hist + hist
        elif pass_index == _SIGN_PASS:
            thresholds = self._global_thresholds()
            for s in slices:
                trimmed = self._trimmed(torch.stack([f[s] for f in flats]), thresholds)
                self._sign_total += sign_total(elect_signs(trimmed))

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
            self._high_hist = None
        elif pass_index == _LOW_PASS:
            if self._thresholds is None:
                if self._low_hist is None or self._high_bins is None or self._low_ranks is None:
                    raise MergelabError("TIES statistics pass 1 saw no tensor; stream every tensor in each pass")
                low_bins, _ = locate_rank(self._low_hist, self._low_ranks)
                self._thresholds = bits_to_float(self._high_bins, low_bins)
            self._low_hist = None
        elif pass_index == _SIGN_PASS:
            self._majority = majority_sign(self._sign_total)

    def merge_task_vectors(self, name: str, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """τ_m for one tensor (already scaled by λ), computed chunk by chunk to keep temporaries small."""
        flats = [t.reshape(-1) for t in taus]
        numel = flats[0].numel()
        slices = chunk_slices(numel)
        if self.params.scope == "global":
            if self._majority is None:
                raise MergelabError(
                    "TIES with scope='global' needs its 3 statistics passes over every tensor before merging"
                )
            thresholds = self._global_thresholds()
            majority = self._majority
        else:
            count = magnitude_keep_count(numel, self.params.density)
            flats = keep_top_each_(flats, count)  # in place: the method owns its τ_t
            thresholds = None  # already trimmed
            majority = 1.0  # mergekit: γ = +1 where Σ_t λ_t τ̂_t ≥ 0
        merged = torch.empty(numel, dtype=flats[0].dtype)
        for s in slices:
            trimmed = self._trimmed(torch.stack([f[s] for f in flats]), thresholds)
            merged[s] = disjoint_merge(
                trimmed, resolve_zero_signs(elect_signs(trimmed), majority), self.params.disjoint
            )
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

    def _trimmed(self, stacked: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
        trimmed = stacked if thresholds is None else trim(stacked, thresholds)
        return trimmed if self._row_scales is None else scale_rows(trimmed, self._row_scales)
