"""TIES-Merging: trim each task vector to its top-k magnitudes, elect a sign per entry, merge agreeing entries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mergelab.core.errors import MergelabError
from mergelab.merging.base import MergeMethod, chunk_slices, per_model_values
from mergelab.merging.fused import SMALL_CHUNK, FusedStep, TiesOutputs, ties_step
from mergelab.merging.ops import (
    Bracket,
    MagnitudeCut,
    Scratch,
    TaskRow,
    TieBreak,
    band_cut,
    bits_to_float,
    disjoint_merge_rows,
    locate_rank,
    magnitude_keep_count,
    majority_sign,
    radix_histogram,
    require_base,
    sample_rows,
    scale_rows,
    sign_total_rows,
    strided_rows,
    task_rows,
    top_cut,
    trim,
    trim_rank,
    values_at,
)
from mergelab.merging.spec import MethodParams, MethodSpec

Scope = Literal["global", "per_tensor"]
Disjoint = Literal["sum", "mean"]

# Global statistics passes: a sample and one counting pass, or (where the sample's bracket misses κ_t) the exact
# radix passes and a sign pass.
_SAMPLE_PASS, _BRACKET_PASS, _HIGH_PASS, _LOW_PASS, _SIGN_PASS = range(5)


PARALLEL_MIN = 1 << 20  # entries from which CPU work is split over threads (the T selections, open-position scans)
DEFER_BYTES = 1 << 28  # τ values global TIES may hold over its counting pass (beyond it: the exact passes run)
GLOBAL_SAMPLE = 1 << 22  # |τ_t| values global TIES samples per model to bracket κ_t
BRACKET_MIN = 1 << 16  # entries from which a per-tensor merge brackets κ_t from a sample instead of selecting first
MERGE_CHUNK = 1 << 18  # entries per chunk of the eager trim-elect-merge loop (1 MB of float32: stays in cache)
FUSED_PASS_CHUNK = 1 << 24  # entries per call of the compiled fused step (no temporaries: fewer, larger calls; its
# float32 kept counts stay exact up to 2**24)


def chunk_scratch(rows: Sequence[TaskRow]) -> Scratch:
    """Buffers for one tensor's fused chunk loop (chunks of at most ``MERGE_CHUNK`` entries)."""
    return Scratch(min(rows[0].numel, MERGE_CHUNK), rows[0].model)


def row_pieces(rows: Sequence[TaskRow], s: slice, work: Scratch) -> list[torch.Tensor]:
    """Chunk ``s`` of every τ_t, the differences computed into ``work``'s buffers."""
    n = s.stop - s.start
    return [row.piece(s, work(f"tau{t}", n)) for t, row in enumerate(rows)]


def per_tensor_cuts(rows: Sequence[TaskRow], count: int, tie_break: TieBreak) -> list[MagnitudeCut]:
    """:func:`~mergelab.merging.ops.top_cut` of every τ_t, in parallel threads for large tensors (the radix passes, and the CPU
    argsort of ``tie_break="argsort"``, release the GIL); errors propagate.

    Measured with ``"argsort"`` at 3.2 GB (base + 3, 2 cores, ties straddling the cut in many tensors): 156 s and
    4.36 GB peak RSS in threads against 231 s and 2.94 GB one τ_t at a time (an int64 index per entry per sort)."""
    if len(rows) < 2 or rows[0].numel < PARALLEL_MIN:
        return [top_cut(row, count, tie_break) for row in rows]
    with ThreadPoolExecutor(max_workers=min(len(rows), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda row: top_cut(row, count, tie_break), rows))


def open_positions(open_: torch.Tensor) -> torch.Tensor:
    """Indices of the non-zero entries of a chunk's ``open`` output. On the CPU, numpy's boolean ``flatnonzero`` on
    one slice per intra-op thread, in threads (it releases the GIL): 1.1 ns per entry here on 2 threads, 2.0 on one,
    2.4 for ``torch.nonzero`` on floats."""
    if open_.device.type != "cpu":
        return open_.nonzero().squeeze(1)
    values = open_.numpy()
    parts = chunk_slices(values.size, -(-values.size // torch.get_num_threads()))
    if len(parts) == 1 or values.size < PARALLEL_MIN:
        return torch.from_numpy(np.flatnonzero(values > 0))
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        found = pool.map(lambda s: np.flatnonzero(values[s] > 0) + s.start, parts)
        return torch.from_numpy(np.concatenate(list(found)))


def _base_of(rows: Sequence[TaskRow]) -> torch.Tensor | None:
    return rows[0].base


def _just_below(kappa: torch.Tensor) -> torch.Tensor:
    """The float32 just below κ (so that |x| > it keeps |x| ≥ κ); −1 for κ = 0 (keep everything)."""
    if float(kappa) <= 0.0:
        return torch.tensor(-1.0)
    return torch.nextafter(kappa.to(torch.float32), torch.tensor(0.0))


class DeferredColumns:
    """``[T, m]`` columns appended into one buffer allocated once at its bound (pages are touched only as they fill):
    many small long-lived tensors fragment the heap, which held 2 GB of peak RSS in a 3.2 GB global TIES merge."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.buffer, self.count = torch.empty(rows, capacity), 0

    def append(self, columns: torch.Tensor) -> bool:
        """Add the columns; False (nothing added) when they would pass the bound."""
        width = columns.shape[1]
        if self.count + width > self.buffer.shape[1]:
            return False
        self.buffer[:, self.count : self.count + width] = columns
        self.count += width
        return True

    def values(self) -> torch.Tensor:
        return self.buffer[:, : self.count]


class StridedSample:
    """|τ_t| of every model at a fixed stride over all merged tensors, in order (a uniform sample of the whole model);
    where the next tensor would take it past ``cap`` values per model, it first keeps every other value held and
    doubles the stride (so no tensor is ever sampled densely: a 65M-entry first tensor sampled at stride 1 and then
    thinned had cost 1.3 s of a 3.2 GB merge)."""

    def __init__(self, rows: int, cap: int, stride: int = 1) -> None:
        self.cap, self.stride = cap, stride
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        self.size = 0

    def add(self, rows: Sequence[TaskRow]) -> None:
        while self.size + -(-rows[0].numel // self.stride) > self.cap and self.stride < rows[0].numel:
            self._thin()
        for part, sample in zip(self.parts, strided_rows(rows, self.stride), strict=True):
            part.append(sample)
        self.size += self.parts[0][-1].numel()

    def _thin(self) -> None:
        if self.size:
            self.parts = [[torch.cat(part)[::2].clone()] for part in self.parts]
            self.size = self.parts[0][0].numel()
        self.stride *= 2

    def values(self, row: int) -> torch.Tensor:
        return torch.cat(self.parts[row])


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
      below 1 (density 1). Exact and streamed: statistics pass 1 samples |τ_t| at a fixed stride over the model
      and brackets κ_t; pass 2 counts |τ_t| above each bracket, finds κ_t exactly from the entries inside it and
      sums the elected signs (holding the τ values of positions whose trim is open until κ_t is known). Where a
      bracket misses, passes 3-5 run instead: the high and low 16 bits of the float32 patterns of |τ_t| (an exact
      radix selection), then the signs.
    * Elect: γ = sign(Σ_t τ̂_t); γ = 0 entries get the majority sign sign(Σ_p γ_p) over all merged tensors.
      One λ for all models is factored out (θ₀ + λ τ_m, as the reference); distinct per-model λ_t (an
      extension) scale τ̂_t before the election.

    ``scope="per_tensor"`` is mergekit 0.1.5's ``ties`` (``merge_methods/generalized_task_arithmetic.py``
    ``merge_group`` with ``sparsify.magnitude`` and ``get_mask(method="sum")``), bit for bit with
    ``normalize: false`` / ``disjoint="sum"`` and ``weight`` λ_t (with ``tie_break="argsort"``):

    * Trim: each tensor of each τ_t keeps exactly max(1, int(density·n)) entries of largest |τ| (all for
      density 1, none for density 0): in one pass, κ_t bracketed from a sample and the positions left open by
      the brackets merged again once κ_t is exact; or, where a bracket misses, after an O(n) radix select
      (the same values either way). Where entries tied with the smallest kept |τ|
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
    borrows_inputs = True  # τ_t is computed chunk by chunk into scratch buffers: the inputs are only read

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
        self._step = FusedStep(ties_step)
        self._warming_started = False
        self._sample: StridedSample | None = None
        self._brackets: list[Bracket] | None = None
        self._bracket_failed = False  # the exact passes run instead of the counting pass
        self._above = torch.zeros(num_models, dtype=torch.float64)
        self._deferred: DeferredColumns | None = None
        self._high_hist: torch.Tensor | None = None
        self._high_bins: torch.Tensor | None = None
        self._low_ranks: torch.Tensor | None = None
        self._low_hist: torch.Tensor | None = None
        self._thresholds: torch.Tensor | None = None
        self._sign_total = 0
        self._majority: float | None = None

    def num_stat_passes(self) -> int:
        return 5 if self.params.scope == "global" else 0

    def pass_needed(self, pass_index: int) -> bool:
        """The sample pass; the counting pass unless the sample could not bracket κ_t; the exact radix and sign
        passes until the majority sign is known (the counting pass settles it where its brackets held). Each
        answer only ever turns from True to False, as the engine's read-ahead needs."""
        if pass_index == _SAMPLE_PASS:
            return True
        if pass_index == _BRACKET_PASS:
            return not self._bracket_failed
        return self._majority is None

    # -- engine interface -------------------------------------------------------------------------------------

    def observe(self, pass_index: int, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> None:
        self._observe_rows(pass_index, task_rows(require_base(base, self.name), models))

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        base = require_base(base, self.name)
        return self._merge(base.reshape(-1), [m.reshape(-1) for m in models]).view(base.shape)

    # -- task-vector interface (reused by DARE) ---------------------------------------------------------------

    def observe_task_vectors(self, pass_index: int, name: str, taus: Sequence[torch.Tensor]) -> None:
        """Accumulate the global statistics of one tensor's task vectors (global scope only), chunk by chunk."""
        self._observe_rows(pass_index, task_rows(None, taus))

    def merge_task_vectors(self, name: str, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """τ_m for one tensor (already scaled by λ), from the method's own τ_t (trimmed in place where needed)."""
        return self._merge(None, [t.reshape(-1) for t in taus]).view(taus[0].shape)

    # -- the passes, on task-vector rows ----------------------------------------------------------------------

    def _observe_rows(self, pass_index: int, rows: Sequence[TaskRow]) -> None:
        if self.params.scope != "global" or not self.pass_needed(pass_index):
            return
        if pass_index == _SAMPLE_PASS:
            self._warm_up(rows)
            self._num_entries += rows[0].numel
            if self._sample is None:
                self._sample = StridedSample(len(rows), GLOBAL_SAMPLE)
            self._sample.add(rows)
        elif pass_index == _BRACKET_PASS:
            self._count_bracketed(rows)
        elif pass_index == _SIGN_PASS:
            high = self._exact_bounds()
            self._sign_total += self._fused_pass(_base_of(rows), [r.model for r in rows], high, high, 0.0, "count")[3]
        else:
            work = chunk_scratch(rows)
            bins = self._high_bins if pass_index == _LOW_PASS else None
            if pass_index == _LOW_PASS and bins is None:
                return
            hist = sum(radix_histogram(row_pieces(rows, s, work), bins) for s in chunk_slices(rows[0].numel, MERGE_CHUNK))
            if pass_index == _HIGH_PASS:
                self._high_hist = hist if self._high_hist is None else self._high_hist + hist
            else:
                self._low_hist = hist if self._low_hist is None else self._low_hist + hist

    def _count_bracketed(self, rows: Sequence[TaskRow]) -> None:
        """Counting pass: |τ_t| above each bracket, Σ sign(S) where every trim is certain, the τ values where not."""
        if self._brackets is None or self._deferred is None:  # failed part-way: the exact passes run
            return
        base, models = _base_of(rows), [r.model for r in rows]
        high = torch.tensor([b.high for b in self._brackets])
        low_cut = torch.tensor([b.low_cut for b in self._brackets])
        _, above, positions, signs = self._fused_pass(base, models, high, low_cut, 0.0, "count")
        self._above += torch.tensor(above, dtype=torch.float64)
        self._sign_total += signs
        if not self._deferred.append(values_at(base, models, positions)):  # more open positions than the bound: the exact passes run
            self._fail_bracket()

    def _fail_bracket(self) -> None:
        self._brackets, self._deferred, self._bracket_failed, self._sign_total = None, None, True, 0

    def end_pass(self, pass_index: int) -> None:
        if self.params.scope != "global" or not self.pass_needed(pass_index):
            return
        k = trim_rank(self._num_entries, self.params.density)
        if pass_index == _SAMPLE_PASS:
            if self._sample is None:
                raise MergelabError("TIES statistics pass 1 saw no tensor; stream every tensor in each pass")
            if k < 1:  # keep everything: κ = 0, and the counting pass only sums the signs
                self._brackets = [Bracket(-1.0, -1.0)] * self.num_models
            else:
                keep = (self._num_entries - k + 1) / self._num_entries  # κ is the (P − k + 1)-th largest |τ|
                guesses = [Bracket.guess(self._sample.values(t), keep) for t in range(self.num_models)]
                if any(g is None for g in guesses):
                    self._fail_bracket()
                else:
                    self._brackets = guesses  # type: ignore[assignment]
            if self._brackets is not None:
                self._deferred = DeferredColumns(self.num_models, DEFER_BYTES // (4 * self.num_models))
            self._sample = None
        elif pass_index == _BRACKET_PASS and self._brackets is not None:
            self._settle_bracketed(k)
        elif pass_index == _HIGH_PASS and self._high_hist is not None:
            ranks = torch.full((self.num_models,), k, dtype=torch.int64)
            self._high_bins, self._low_ranks = locate_rank(self._high_hist, ranks)
            self._high_hist = None
        elif pass_index == _LOW_PASS and self._low_hist is not None:
            low_bins, _ = locate_rank(self._low_hist, self._low_ranks)  # type: ignore[arg-type]
            self._thresholds = bits_to_float(self._high_bins, low_bins)  # type: ignore[arg-type]
            self._low_hist = None
        elif pass_index == _SIGN_PASS and self._majority is None:
            self._majority = majority_sign(self._sign_total)

    def _settle_bracketed(self, k: int) -> None:
        """κ_t from the counts and the held τ values; their sign statistics with it, then the majority sign. Where
        a bracket missed κ_t, the exact passes run instead."""
        values = self._deferred.values() if self._deferred is not None else torch.zeros(self.num_models, 0)
        if k < 1:
            thresholds = torch.zeros(self.num_models)
        else:
            count = self._num_entries - k + 1
            cuts = [band_cut(b.inside(values[t]), round(float(self._above[t])), count)
                    for t, b in enumerate(self._brackets)]  # type: ignore[arg-type]  # fmt: skip
            if any(c is None for c in cuts):
                self._fail_bracket()
                return
            thresholds = torch.stack([c[0] for c in cuts])  # type: ignore[index]
        self._thresholds = thresholds
        for s in chunk_slices(values.shape[1], MERGE_CHUNK):
            trimmed = trim(values[:, s], thresholds)
            self._sign_total += sign_total_rows(list(trimmed if self._row_scales is None
                                                     else scale_rows(trimmed, self._row_scales)))  # fmt: skip
        self._deferred = None
        self._majority = majority_sign(self._sign_total)

    def _exact_bounds(self) -> torch.Tensor:
        """Per row, the float32 just below κ_t: |τ| above it keeps |τ| ≥ κ_t (every tie); −1 for κ_t = 0."""
        return torch.stack([_just_below(kappa) for kappa in self._global_thresholds()])

    def _merge(self, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        """θ₀ + λ·τ_m for one flat tensor (λ·τ_m without a base: ``models`` are then the method's own τ_t)."""
        numel = models[0].numel()
        if self.params.scope == "global":
            if self._majority is None:
                raise MergelabError(
                    "TIES with scope='global' needs its statistics passes over every tensor before merging"
                )
            high = self._exact_bounds()
            return self._fused_pass(base, models, high, high, self._majority, "merge")[0]  # type: ignore[return-value]
        count = magnitude_keep_count(numel, self.params.density)
        if 0 < count < numel and numel >= BRACKET_MIN:
            merged = self._merge_bracketed(base, models, count)
            if merged is not None:
                return merged
        rows = task_rows(base, models)
        cuts = per_tensor_cuts(rows, count, self.params.tie_break)
        merged, work = models[0].new_empty(numel), chunk_scratch(rows)
        for s in chunk_slices(numel, MERGE_CHUNK):
            trimmed = self._trimmed_rows(rows, cuts, s, work)
            disjoint_merge_rows(trimmed, 1.0, self.params.disjoint, out=merged[s], scratch=work)  # mergekit: γ = + where Σ ≥ 0
        return merged.add_(base) if base is not None else merged

    def _fused_pass(self, base: torch.Tensor | None, models: Sequence[torch.Tensor], high: torch.Tensor,
                    low_cut: torch.Tensor, majority: float, outputs: TiesOutputs,
                    ) -> tuple[torch.Tensor | None, list[int], torch.Tensor, int]:  # fmt: skip
        """One pass of :func:`~mergelab.merging.fused.ties_step` over a flat tensor in chunks: (result (None for
        ``"count"``), |τ_t| > high_t counts, the open positions in index order, Σ sign(S) where not open); what
        ``outputs`` does not compute is empty (no counts, no positions) or 0."""
        numel = models[0].numel()
        device = models[0].device
        constants = self._step_constants(device, high, low_cut, majority)
        kept, signs, open_at = torch.zeros(len(models), dtype=torch.float64), 0.0, []
        chunk = FUSED_PASS_CHUNK if self._step.compiling else MERGE_CHUNK  # eager: temporaries of one chunk each
        slices = chunk_slices(numel, chunk)
        result = None if outputs == "count" or len(slices) == 1 else models[0].new_empty(numel)
        for s in slices:
            step = self._step(s.stop - s.start, base[s] if base is not None else None, [m[s] for m in models],
                              *constants, self.params.disjoint == "mean", outputs)  # fmt: skip
            if result is not None:
                result[s] = step.result
            elif outputs != "count":  # one chunk: the step's own output is the result
                result = step.result
            if step.kept is not None:
                kept += step.kept.to(device="cpu", dtype=torch.float64)
            if step.signs is not None:
                signs += float(step.signs)
            positions = open_positions(step.open) if step.open is not None else None
            if positions is not None and positions.numel():
                open_at.append(positions + s.start)
        positions = torch.cat(open_at) if open_at else torch.zeros(0, dtype=torch.int64, device=device)
        return result, [round(float(k)) for k in kept], positions, round(signs)

    def _step_constants(self, device: torch.device, high: torch.Tensor, low_cut: torch.Tensor,
                        majority: float) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """The fused step's per-pass arguments after the chunks: (high, low_cut, λ_t, outer λ, majority sign)."""
        scales = self._row_scales if self._row_scales is not None else [1.0] * self.num_models
        return (high.to(device), low_cut.to(device), torch.tensor(scales, device=device),
                torch.tensor(self._outer_scale, device=device), torch.tensor(majority, device=device))  # fmt: skip

    def _warm_up(self, rows: Sequence[TaskRow]) -> None:
        """Global scope: compile the counting and merging steps on a background thread while the sample pass runs
        (≈ 4 s of the first compile in a process, overlapped), from the first tensor large enough to compile for."""
        if self._warming_started or rows[0].numel < SMALL_CHUNK:
            return
        self._warming_started = True
        head, base = slice(0, SMALL_CHUNK), _base_of(rows)
        chunks = (base[head].clone() if base is not None else None, [row.model[head].clone() for row in rows])
        bounds = torch.zeros(self.num_models)
        constants = self._step_constants(rows[0].model.device, bounds, bounds, 1.0)
        mean = self.params.disjoint == "mean"
        self._step.warm_up(*[(*chunks, *constants, mean, outputs) for outputs in ("count", "merge")])

    def _merge_bracketed(self, base: torch.Tensor | None, models: Sequence[torch.Tensor],
                         count: int) -> torch.Tensor | None:  # fmt: skip
        """Per-tensor TIES in one pass over the inputs, without a prior selection pass: each κ_t is bracketed from a
        sample, positions where every row's trim is already certain are merged at once, and those where some row
        falls inside its bracket are merged again once the pass has counted κ_t exactly (with the elementwise steps
        of the exact path, so the same values). None where a bracket misses κ_t (or mergekit's argsort order
        decides straddling ties): the caller then takes the exact path."""
        rows = task_rows(base, models)
        brackets = [Bracket.guess(sample, count / rows[0].numel) for sample in sample_rows(rows)]
        if any(b is None for b in brackets):
            return None
        high = torch.tensor([b.high for b in brackets])  # type: ignore[union-attr]
        low_cut = torch.tensor([b.low_cut for b in brackets])  # type: ignore[union-attr]
        result, above, positions, _ = self._fused_pass(base, models, high, low_cut, 1.0, "bracket")  # mergekit: γ = + where Σ ≥ 0
        values = values_at(base, models, positions)
        cuts = []
        for t, bracket in enumerate(brackets):
            exact = band_cut(bracket.inside(values[t]), above[t], count)  # type: ignore[union-attr]
            if exact is None:
                return None
            kappa, greater, tied = exact
            if self.params.tie_break == "argsort" and greater + tied > count:
                return None
            cuts.append(MagnitudeCut(kappa, count - greater, tied))
        if positions.numel():
            fixed = self._trimmed_rows(task_rows(None, values), cuts, slice(0, positions.numel()),
                                       Scratch(positions.numel(), values))  # fmt: skip
            merged = disjoint_merge_rows(fixed, 1.0, self.params.disjoint)
            result[positions] = base[positions] + merged if base is not None else merged
        return result

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

    def _trimmed_rows(self, rows: Sequence[TaskRow], cuts: Sequence[MagnitudeCut], s: slice,
                      work: Scratch) -> list[torch.Tensor]:  # fmt: skip
        """The chunk ``s`` of every τ_t trimmed (and scaled by its λ_t when the λ_t differ)."""
        trimmed = [cut.trim_(piece, work) for piece, cut in zip(row_pieces(rows, s, work), cuts, strict=True)]
        if self._row_scales is None:
            return trimmed
        return [row.mul_(scale) for row, scale in zip(trimmed, self._row_scales, strict=True)]
