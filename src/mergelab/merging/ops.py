"""Small pure tensor functions shared by the merging methods.

* Task vectors τ_t = θ_t − θ₀ (in place for the streaming engine's owned copies, or as new tensors).
* TIES: the two trim rules (global: FusionBench's k-th value threshold; per tensor: mergekit's exact top-count),
  trimming, sign election, zero-sign resolution, sign agreement, disjoint merge, and the whole-model TIES-selected
  vectors (AdaMerging++, TALL masks over TIES).
* TALL masks and the consensus mask (Consensus merging, ``tall_consensus``, TALL-mask reconstructions).
* One exact k-th smallest |x| routine family over float32 magnitudes (two radix passes over the bit patterns):
  ``radix_select`` and the two views of it, ``kth_smallest_magnitude`` (per row) and ``magnitude_cut`` (one tensor).
* Brackets: an interval [low, high] guessed from a uniform sample of |x| that holds κ, so that one counting pass
  (``band_cut``) finds κ exactly from the entries inside it (TIES' fast paths; a miss falls back to the radix).
* DARE: a drop mask that is a deterministic function of (seed, model index, tensor name).
* CART: truncated SVD with a rank from a ratio of min(m, n) or from an energy (σ²) share.

Stacked inputs are ``[T, ...]`` tensors: one row per fine-tuned model.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mergelab.core.errors import ConfigError, MergelabError

RADIX_BITS = 16
RADIX_BINS = 1 << RADIX_BITS
RADIX_CHUNK = 1 << 18  # entries per radix-histogram chunk of one tensor (1 MB of float32: stays in cache)
SAMPLE_TARGET = 1 << 16  # entries sampled per row to bracket a magnitude cut
BRACKET_SIGMAS = 4.0  # half-width of that bracket, in binomial standard deviations of the sample rank
_LOW_MASK = RADIX_BINS - 1


def require_base(base: torch.Tensor | None, method: str) -> torch.Tensor:
    """The base tensor; a missing base is a configuration error."""
    if base is None:
        raise ConfigError(f"method '{method}' needs the pretrained base tensor; pass the base checkpoint")
    return base


def task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor], *, in_place: bool = False) -> list[torch.Tensor]:
    """τ_t = θ_t − θ₀ (float32) for every model.

    ``in_place=True`` overwrites the (float32) model tensors with their task vectors: the streaming engine's inputs
    are fresh copies owned by the method, and this keeps its peak memory near (T + 2) tensors.
    """
    if in_place:
        return [m.sub_(base) for m in models]
    return [m.float() - base.float() for m in models]


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-model vector ``[T]`` to broadcast against a stacked ``[T, ...]`` tensor."""
    return values.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------------- TIES


def trim_rank(num_entries: int, density: float) -> int:
    """Global rule (FusionBench ``topk_values_mask``): the 1-indexed rank k of the threshold, κ = the
    (P − ⌊density·P⌋)-th smallest |τ|.

    Keeping |τ| ≥ κ keeps ⌊density·P⌋ + 1 entries barring ties, and every entry tied with κ; k < 1 means keep
    everything.
    """
    return num_entries - math.floor(density * num_entries)


def magnitude_keep_count(num_entries: int, density: float) -> int:
    """Per-tensor rule (mergekit 0.1.5 ``sparsify.magnitude``): how many entries of a tensor are kept.

    Everything for density ≥ 1, nothing for density ≤ 0 or an empty tensor, else exactly
    max(1, int(density·n)) (Python float product, truncated). PEFT's ``magnitude_based_pruning`` keeps
    int(density·n) without the floor of 1, so the two differ only where density·n < 1.
    """
    if num_entries <= 0 or density <= 0:
        return 0
    if density >= 1:
        return num_entries
    return max(1, int(density * num_entries))


TieBreak = Literal["index", "argsort"]


@dataclass(frozen=True)
class TaskRow:
    """One tensor's τ_t, flat, produced chunk by chunk: ``model − base`` from inputs that are only read (each chunk
    computed into a caller's buffer), or, with ``base`` None, a τ_t the caller owns (chunks are views of it, and a
    trim overwrites them)."""

    model: torch.Tensor
    base: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.model.numel()

    def piece(self, s: slice, buffer: torch.Tensor) -> torch.Tensor:
        """τ_t[s]: computed into ``buffer`` (at least ``s``'s length) for a difference, the owned slice otherwise."""
        if self.base is None:
            return self.model[s]
        return torch.sub(self.model[s], self.base[s], out=buffer[: s.stop - s.start])

    def whole(self) -> torch.Tensor:
        """τ_t as one tensor: the owned tensor itself, or a new difference."""
        return self.model if self.base is None else self.model - self.base


def task_rows(base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> list[TaskRow]:
    """One tensor's τ_t rows, flat: differences from ``base``, or (``base`` None) ``models`` themselves as owned τ_t."""
    flat_base = base.reshape(-1) if base is not None else None
    return [TaskRow(m.reshape(-1), flat_base) for m in models]


def strided_rows(rows: Sequence[TaskRow], stride: int) -> list[torch.Tensor]:
    """|τ_t| of every row (one tensor's rows, one base) at every ``stride``-th position, as new tensors; the base is
    gathered once for all rows."""
    base = rows[0].base
    if base is None:
        return [row.model[::stride].abs() for row in rows]
    at_base = base[::stride].contiguous()
    return [torch.sub(row.model[::stride], at_base).abs_() for row in rows]


def values_at(base: torch.Tensor | None, models: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """``[T, m]``: τ_t at ``positions`` (flat indices) of every model (``base`` None: ``models`` are τ_t)."""
    values = torch.stack([m.take(positions) for m in models])  # take: half the time of indexing here
    return values.sub_(base.take(positions)) if base is not None else values


class _RowPieces(Sequence[torch.Tensor]):
    """``[1, chunk]`` pieces of a :class:`TaskRow` for the radix passes, computed on access into one buffer (each piece
    is used before the next is asked for)."""

    def __init__(self, row: TaskRow, chunk: int) -> None:
        self.row, self.chunk = row, chunk
        self.buffer = row.model.new_empty(min(chunk, row.numel)) if row.base is not None else row.model

    def __len__(self) -> int:
        return max(1, -(-self.row.numel // self.chunk))

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.chunk
        return self.row.piece(slice(start, min(start + self.chunk, self.row.numel)), self.buffer).unsqueeze(0)


def sample_target(numel: int) -> int:
    """How many entries to sample per row of ``numel`` to bracket its cut: (2n)^(2/3), at least ``SAMPLE_TARGET``.

    Sampling costs ∝ m per row, the open positions a bracket leaves ∝ n/√m (its width in binomial standard
    deviations); with the costs measured here (≈ 80 ns per sampled entry, ≈ 100 ns per open position) the sum is
    least near m = (2n)^(2/3): 80K for an 11.5M-entry tensor, 258K for a 65.5M-entry embedding."""
    return max(SAMPLE_TARGET, round((2 * numel) ** (2 / 3)))


def sample_rows(rows: Sequence[TaskRow], target: int | None = None) -> list[torch.Tensor]:
    """|τ_t| of every row (one tensor's rows, one base) at the same ≈ ``target`` evenly strided positions (an odd
    stride; every entry of a short row; default :func:`sample_target`)."""
    numel = rows[0].numel
    return strided_rows(rows, max(1, numel // (target or sample_target(numel))) | 1)


@dataclass(frozen=True)
class Bracket:
    """A guessed interval [low, high] holding a row's κ (0 < low): entries with |x| > high are kept whatever κ is
    inside it, entries below low dropped, and those in between (ties at either end included) stay open until κ is
    exact. A guess from a sample: the counts of a full pass check it (:func:`band_cut`)."""

    low: float
    high: float
    low_cut: float = field(init=False)  # the float32 just below ``low``: |x| > low_cut keeps |x| ≥ low

    def __post_init__(self) -> None:
        object.__setattr__(self, "low_cut", _below(self.low))

    @classmethod
    def guess(cls, sample: torch.Tensor, keep_fraction: float) -> Bracket | None:
        """From a uniform ``sample`` of |x|: the sample's order statistics ``BRACKET_SIGMAS`` binomial standard
        deviations (plus 8 ranks) either side of the ``keep_fraction`` share kept (high = +inf past the top);
        None where the low end reaches 0 (many exact zeros, or density near 1)."""
        m = sample.numel()
        centre = keep_fraction * m
        margin = BRACKET_SIGMAS * math.sqrt(keep_fraction * (1.0 - keep_fraction) * m) + 8.0
        above, below = math.floor(centre - margin), math.ceil(centre + margin)  # ranks from the top
        if below > m:
            return None
        if above >= 1:
            low, high = kth_smallest(sample, [m - below + 1, m - above + 1])
        else:
            low, high = kth_smallest(sample, [m - below + 1])[0], math.inf
        return cls(low, high) if low > 0.0 else None

    def inside(self, values: torch.Tensor) -> torch.Tensor:
        """The |x| of ``values`` inside [low, high]."""
        magnitudes = values.abs()
        return magnitudes[(magnitudes >= self.low) & (magnitudes <= self.high)]


def _below(value: float) -> float:
    """The float32 just below a positive ``value`` (+inf stays +inf)."""
    if math.isinf(value):
        return value
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(0.0)))


def band_cut(band: torch.Tensor, above: int, count: int) -> tuple[torch.Tensor, int, int] | None:
    """(κ, greater, tied) of the ``count``-th largest |x| of a row, given how many |x| lie ``above`` its bracket and
    the |x| inside it (``band``); None when κ is not inside (the bracket missed)."""
    need = count - above
    if not 1 <= need <= band.numel():
        return None
    kappa = torch.tensor(kth_smallest(band, [band.numel() - need + 1])[0], dtype=band.dtype, device=band.device)
    return kappa, above + int((band > kappa).sum()), int((band == kappa).sum())


def kth_smallest(values: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """The ``ranks``-th smallest entries (1-indexed) of a 1-D tensor without NaN: by one ``numpy.partition`` on the
    CPU (all ranks at once: 0.8 ms for two ranks of 65K entries against 2.2 for two ``kthvalue``), by
    ``kthvalue`` on other devices."""
    if values.device.type == "cpu":
        indices = [r - 1 for r in ranks]
        return [float(v) for v in np.partition(values.numpy(), indices)[indices]]
    return [float(values.kthvalue(r).values) for r in ranks]


def row_magnitude_cut(row: TaskRow, count: int) -> tuple[torch.Tensor, int, int]:
    """(κ, greater, tied) for keeping ``count`` entries of largest |τ_t| of one float32 :class:`TaskRow`
    (0 < count < n): κ is the ``count``-th largest |x|, ``greater`` the entries with |x| > κ and ``tied`` those with
    |x| = κ, all from one O(n) radix selection (two passes, chunk by chunk). The cut straddles ties when
    greater + tied > count."""
    n, k = row.numel, row.numel - count + 1  # κ is the k-th smallest |x|
    ranks = torch.tensor([k], device=row.model.device)
    kappa, rank_among_equals, tied = _radix_select_counts(_RowPieces(row, RADIX_CHUNK), ranks)
    less = k - int(rank_among_equals[0])
    return kappa[0], n - less - int(tied[0]), int(tied[0])


def magnitude_cut(values: torch.Tensor, count: int) -> tuple[torch.Tensor, int, int]:
    """:func:`row_magnitude_cut` of a float32 tensor of any shape."""
    return row_magnitude_cut(TaskRow(values.reshape(-1)), count)


def top_magnitude_threshold(values: torch.Tensor, count: int) -> torch.Tensor | None:
    """κ such that exactly ``count`` entries of the float32 tensor ``values`` have |x| not below κ, found in O(n)
    by radix selection; None when entries tied with the ``count``-th largest |x| straddle the cut, so that no
    threshold keeps exactly ``count``. Needs 0 < count < n."""
    kappa, greater, tied = magnitude_cut(values, count)
    return kappa if greater + tied == count else None


def top_magnitude_order_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (shape of ``values``) of the first ``count`` entries of ``torch.argsort(|x|, descending=True)``.

    This is mergekit's own selection and its tie-break: CPU argsort is unstable (introsort), so among equal |x|
    the kept ones are neither the lowest nor the highest indices and only this call reproduces them. O(n log n):
    used only for ``tie_break="argsort"`` where ties straddle the cut.
    """
    flat = values.reshape(-1).cpu()  # the CPU sort's tie order, wherever the tensor lives
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat.abs().float(), descending=True)[:count]] = True
    return keep.reshape(values.shape).to(values.device)


def first_ties_mask(magnitudes: torch.Tensor, kappa: torch.Tensor, quota: int) -> tuple[torch.Tensor, int]:
    """(keep, tied): keep |x| > κ and the first ``quota`` entries (index order) with |x| = κ, on a 1-D tensor of
    magnitudes; ``tied`` is how many entries equal κ here (the caller carries the quota over chunks)."""
    equal = magnitudes == kappa
    ranks = equal.cumsum(0)
    tied = int(ranks[-1]) if ranks.numel() else 0
    return (magnitudes > kappa) | (equal & (ranks <= quota)), tied


def top_magnitude_mask(values: torch.Tensor, count: int, tie_break: TieBreak = "index") -> torch.Tensor:
    """Bool mask of exactly ``count`` entries of largest |x| (the per-tensor TIES selection). Entries tied with the
    smallest kept |x| that straddle the cut are kept in index order (``"index"``: the order of a stable descending
    sort, O(n)) or in the order of ``torch.argsort(|x|, descending=True)`` (``"argsort"``: mergekit's, O(n log n))."""
    n = values.numel()
    if count <= 0 or count >= n:
        return torch.full(values.shape, count >= n, dtype=torch.bool, device=values.device)
    kappa, greater, tied = magnitude_cut(values, count)
    if greater + tied == count:
        return ~(values.abs() < kappa)
    if tie_break == "argsort":
        return top_magnitude_order_mask(values, count)
    return first_ties_mask(values.reshape(-1).abs(), kappa, count - greater)[0].reshape(values.shape)


class Scratch:
    """Reusable buffers for the fused chunk loops, one per name, allocated on first use: the temporaries of a chunk
    are allocated once per tensor, not once per operation (a fresh 4 MB tensor per step costs page faults that
    outweigh the arithmetic). ``scratch(name, n)`` is a view of the first ``n`` entries."""

    def __init__(self, size: int, like: torch.Tensor) -> None:
        self.size, self.dtype, self.device = size, like.dtype, like.device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, n: int) -> torch.Tensor:
        if n > self.size:
            raise MergelabError(f"scratch buffer '{name}' holds {self.size} entries, {n} asked")
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.size, dtype=self.dtype, device=self.device)
        return self._buffers[name][:n]


def scratch_for(piece: torch.Tensor, scratch: Scratch | None) -> Scratch:
    """``scratch``, or a fresh one the size of ``piece`` (callers outside a chunk loop)."""
    return scratch if scratch is not None else Scratch(piece.numel(), piece)


@dataclass
class MagnitudeCut:
    """Which entries of one flat tensor a TIES trim keeps, applied chunk by chunk in index order: |x| > κ, and of the
    entries with |x| = κ the first ``quota`` (``tied`` of them lie ahead). ``quota ≥ tied`` keeps every tie: a plain
    threshold, as the global scope (|x| ≥ κ); ``keep_none`` drops everything (density 0); ``keep``, a flat bool mask
    of the kept entries, overrides the rest (mergekit's argsort order where ties straddle the cut)."""

    kappa: torch.Tensor
    quota: int = sys.maxsize
    tied: int = 0
    keep_none: bool = False
    keep: torch.Tensor | None = None
    offset: int = 0  # entries trimmed so far (where the next chunk starts)

    @classmethod
    def top(cls, row: TaskRow, count: int) -> MagnitudeCut:
        """Exactly ``count`` entries of largest |τ_t| of a float32 row, ties at the cut kept in index order."""
        n = row.numel
        if count <= 0 or n == 0:
            return cls(torch.zeros(()), keep_none=True)
        if count >= n:
            return cls(torch.zeros(()))
        kappa, greater, tied = row_magnitude_cut(row, count)
        return cls(kappa, count - greater, tied)

    def trim_(self, piece: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """Zero, in place, the entries of the next chunk ``piece`` (1-D, in index order) that the cut drops."""
        n = piece.numel()
        start, self.offset = self.offset, self.offset + n
        if self.keep is not None:
            return piece.masked_fill_(~self.keep[start : start + n], 0.0)
        if self.keep_none:
            return piece.zero_()
        work = scratch_for(piece, scratch)
        magnitudes = torch.abs(piece, out=work("magnitudes", n))
        if self.quota >= self.tied:  # every tie ahead fits
            return piece.mul_(at_least(magnitudes, self.kappa, out=work("gate", n)))
        if self.quota == 0:  # no tie fits any more
            return piece.mul_(above(magnitudes, self.kappa, out=work("gate", n)))
        piece.mul_(at_least(magnitudes, self.kappa, out=work("gate", n)))
        tied_at = (magnitudes == self.kappa).nonzero().squeeze(1)  # ascending indices
        piece[tied_at[self.quota :]] = 0.0
        self.quota, self.tied = max(self.quota - tied_at.numel(), 0), self.tied - tied_at.numel()
        return piece


def top_cut(row: TaskRow, count: int, tie_break: TieBreak = "index") -> MagnitudeCut:
    """The per-tensor trim of a float32 :class:`TaskRow`: its exact top-``count`` cut (:meth:`MagnitudeCut.top`).
    With ``tie_break="argsort"`` and ties straddling the cut, the cut keeps mergekit's argsort selection instead."""
    cut = MagnitudeCut.top(row, count)
    if tie_break == "argsort" and not cut.keep_none and cut.quota < cut.tied:
        return MagnitudeCut(torch.zeros(()), keep=top_magnitude_order_mask(row.whole(), count).reshape(-1))
    return cut


def keep_top_magnitudes_(values: torch.Tensor, count: int, chunk: int = 1 << 22,
                         tie_break: TieBreak = "index") -> torch.Tensor:  # fmt: skip
    """In place: zero every entry of ``values`` outside :func:`top_magnitude_mask` (``count`` entries stay): one
    O(n) selection plus a chunked pass with temporaries of one chunk (``"argsort"`` sorts where ties straddle)."""
    if not values.is_contiguous():
        return values.masked_fill_(~top_magnitude_mask(values, count, tie_break), 0.0)
    flat = values.view(-1)
    cut = top_cut(TaskRow(flat), count, tie_break)
    for start in range(0, flat.numel(), chunk):
        cut.trim_(flat[start : start + chunk])
    return values


def row_sum(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_t rows[t] in row order (the order of ``torch.stack(rows).sum(0)``), as a new tensor."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


def at_least(values: torch.Tensor, threshold: torch.Tensor | float, out: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where ``values`` ≥ ``threshold``, else 0.0, in float arithmetic (sign(v − t) is exact: v − t is 0 only
    when v = t). Multiplying by it trims several times faster than a boolean ``masked_fill`` / ``where`` on CPU."""
    return torch.sub(values, threshold, out=out).sign_().add_(1.0).clamp_(max=1.0)


def above(values: torch.Tensor, threshold: torch.Tensor | float, out: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where ``values`` > ``threshold``, else 0.0 (see :func:`at_least`)."""
    return torch.sub(values, threshold, out=out).sign_().clamp_(min=0.0)


def sign_gates_(signs: torch.Tensor, majority: float, plus: torch.Tensor, minus: torch.Tensor) -> None:
    """Fill ``plus`` / ``minus`` with 1.0 where the elected sign γ is + (resp. −), given sign(Σ_t τ̂_t) and the sign
    ``majority`` that zero sums take (0: they stay 0, no side)."""
    if majority > 0:
        torch.add(signs, 1.0, out=plus).clamp_(max=1.0)
        torch.neg(plus, out=minus).add_(1.0)
    elif majority < 0:
        torch.neg(signs, out=minus).add_(1.0).clamp_(max=1.0)
        torch.neg(minus, out=plus).add_(1.0)
    else:
        torch.clamp(signs, min=0.0, out=plus)
        torch.neg(signs, out=minus).clamp_(min=0.0)


def sides_(rows: Sequence[torch.Tensor], work: Scratch, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_t max(r_t, 0), Σ_t min(r_t, 0), Σ_t r_t), each summed in row order, in ``work``'s buffers."""
    pos, neg, total, part = work("pos", n), work("neg", n), work("total", n), work("part", n)
    for index, row in enumerate(rows):
        positive = torch.clamp(row, min=0, out=part if index else pos)
        if index:
            pos.add_(positive)
            neg.add_(torch.sub(row, positive, out=work("negative", n)))
            total.add_(row)
        else:
            torch.sub(row, positive, out=neg)
            total.copy_(row)
    return pos, neg, total


def side_counts_(rows: Sequence[torch.Tensor], work: Scratch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(#{t: r_t > 0}, #{t: r_t < 0}) per entry, as floats, in ``work``'s buffers."""
    plus, minus, part = work("count+", n).zero_(), work("count-", n).zero_(), work("part", n)
    for row in rows:
        signs = torch.sign(row, out=part)
        plus.add_(torch.clamp(signs, min=0.0, out=work("gate", n)))
        minus.add_(signs.neg_().clamp_(min=0.0))
    return plus, minus


def disjoint_merge_rows(rows: Sequence[torch.Tensor], majority: float, mode: Literal["sum", "mean"],
                        out: torch.Tensor | None = None, scratch: Scratch | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`disjoint_merge` of the trimmed ``rows`` with γ = sign(Σ_t rows) and zero signs set to ``majority``,
    without stacking: Σ of the positive entries where γ > 0, of the negative ones where γ < 0 (each in row order,
    so the values equal the stacked computation's), 0 where γ = 0; "mean" divides by the count, at least 1. The
    choice is arithmetic, pos·g₊ + neg·g₋ (exact: the other side is multiplied by 0), not a boolean ``where``;
    every temporary lives in ``scratch``. Written to ``out`` when given."""
    n = rows[0].numel()
    work = scratch_for(rows[0], scratch)
    pos, neg, total = sides_(rows, work, n)
    if mode == "mean":
        count_plus, count_minus = side_counts_(rows, work, n)
        pos.div_(count_plus.clamp_(min=1))
        neg.div_(count_minus.clamp_(min=1))
    plus, minus = work("gate", n), work("part", n)
    sign_gates_(total.sign_(), majority, plus, minus)
    out = torch.mul(pos, plus, out=out)
    return out.add_(neg.mul_(minus))


def sign_total_rows(rows: Sequence[torch.Tensor], scratch: Scratch | None = None) -> int:
    """Σ_p sign(Σ_t rows[t])_p as an exact integer (the majority sign's statistic), without stacking."""
    total = scratch_for(rows[0], scratch)("total", rows[0].numel()).copy_(rows[0])
    for row in rows[1:]:
        total.add_(row)
    return round(float(total.sign_().sum(dtype=torch.float64)))


def trim(stacked: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of row t whose magnitude is below κ_t (entries equal to κ_t are kept)."""
    return stacked.masked_fill(stacked.abs() < _rows(thresholds.to(stacked.dtype), stacked), 0.0)


def scale_rows(stacked: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """Multiply row t by scales[t]."""
    return stacked * _rows(torch.tensor(scales, dtype=stacked.dtype), stacked)


def elect_signs(trimmed: torch.Tensor) -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) elementwise (0 where the total mass is exactly 0)."""
    return trimmed.sum(0).sign()


def sign_total(signs: torch.Tensor) -> int:
    """Σ_p γ_p as an exact integer (used for the majority sign)."""
    return int(signs.to(torch.int64).sum())


def majority_sign(total: int) -> float:
    """sign(Σ_p γ_p): +1, −1, or 0 when the elected signs balance exactly."""
    return float((total > 0) - (total < 0))


def resolve_zero_signs(signs: torch.Tensor, majority: float) -> torch.Tensor:
    """Give entries with γ = 0 the sign ``majority``: the majority sign over the scope (TIES and FusionBench
    ``resolve_zero_signs(..., "majority")``), or +1 (mergekit ``get_mask``: γ = +1 where Σ_t τ̂_t ≥ 0)."""
    return torch.where(signs == 0, torch.tensor(majority, dtype=signs.dtype), signs)


def sign_agreement(trimmed: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Bool mask of the non-zero entries of each row whose sign agrees with γ."""
    return ((trimmed > 0) & (signs > 0)) | ((trimmed < 0) & (signs < 0))


def disjoint_merge(trimmed: torch.Tensor, signs: torch.Tensor, mode: Literal["sum", "mean"]) -> torch.Tensor:
    """Sum (or mean over max(count, 1)) of the non-zero entries whose sign agrees with γ."""
    agree = sign_agreement(trimmed, signs)
    total = torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype)).sum(0)
    if mode == "sum":
        return total
    return total / agree.sum(0).clamp(min=1).to(trimmed.dtype)


class _Stacked(Sequence[torch.Tensor]):
    """``[T, numel]`` stacks of one tensor name at a time, built on access (no T×P copy held at once)."""

    def __init__(self, taus: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
        self.taus, self.names = taus, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < len(self.names):
            raise IndexError(index)
        return torch.stack([t[self.names[index]].float().reshape(-1) for t in self.taus])


def ties_selected_vectors(
    taus: Sequence[Mapping[str, torch.Tensor]], density: float = 0.2
) -> list[dict[str, torch.Tensor]]:
    """TIES ``selected_entries`` of whole models: trim each τ_t to its global top-``density`` magnitudes (over all
    its tensors, the global rule), elect γ = sign(Σ_t τ̂_t) with zero signs set to the global majority, keep the
    entries agreeing with γ. Σ_t of the result is the TIES dis-sum multi-task vector; AdaMerging++ learns
    coefficients on the result."""
    names = list(taus[0])
    stacks = _Stacked(taus, names)
    k = trim_rank(sum(taus[0][n].numel() for n in names), density)
    thresholds = kth_smallest_magnitude(stacks, k) if k >= 1 else torch.zeros(len(taus))
    majority = majority_sign(sum(sign_total(elect_signs(trim(chunk, thresholds))) for chunk in stacks))
    out: list[dict[str, torch.Tensor]] = [{} for _ in taus]
    for name, chunk in zip(names, stacks, strict=True):
        trimmed = trim(chunk, thresholds)
        agree = sign_agreement(trimmed, resolve_zero_signs(elect_signs(trimmed), majority))
        kept = torch.where(agree, trimmed, torch.zeros(()))
        for t, tau in enumerate(taus):
            out[t][name] = kept[t].reshape(tau[name].shape).clone()
    return out


def ties_multitask_vector(taus: Sequence[Mapping[str, torch.Tensor]], density: float = 0.2) -> dict[str, torch.Tensor]:
    """The TIES dis-sum multi-task vector Σ_t selected_t (K = 20 ⇔ ``density`` 0.2)."""
    selected = ties_selected_vectors(taus, density)
    return {n: torch.stack([s[n] for s in selected]).sum(0) for n in taus[0]}


# ---------------------------------------------------------------------------------------------------- TALL masks


def tall_mask(tau: torch.Tensor, multitask: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """TALL mask of one task: m_t = 1[|τ_t| > λ · |τ_MTL − τ_t|] (strict, as the official code)."""
    return tau.abs() > tall_lambda * (multitask - tau).abs()


def consensus_mask(masks: Sequence[torch.Tensor], min_tasks: int) -> torch.Tensor:
    """M = 1[Σ_t m_t ≥ k]: the weights at least ``min_tasks`` tasks' TALL masks keep."""
    return torch.stack(list(masks)).sum(0) >= min_tasks


# ---------------------------------------------------------------------------------------------------- radix select


def magnitude_bits(stacked: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| for float32 ``x``; non-negative floats order exactly like these integers."""
    if stacked.dtype != torch.float32:
        raise MergelabError(f"radix selection works on float32 magnitudes, got {stacked.dtype}")
    return stacked.abs().contiguous().view(torch.int32)


def radix_histogram(rows: Sequence[torch.Tensor] | torch.Tensor, high_bins: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram ``[T, 65536]`` (int64) of the float32 magnitudes of each of the T ``rows`` (any shape each).

    Without ``high_bins``: of the high 16 bits of |x|. With ``high_bins`` ``[T]``: of the low 16 bits of the
    entries of row t whose high 16 bits equal ``high_bins[t]``. Rows are processed one at a time, so the
    temporaries are the size of one row.
    """
    counts = []
    for index, row in enumerate(rows):
        high, low = magnitude_halves(row)
        values = high if high_bins is None else low[high == int(high_bins[index])].to(torch.int32) & _LOW_MASK
        counts.append(torch.bincount(values, minlength=RADIX_BINS))
    return torch.stack(counts)


def magnitude_halves(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 16-bit halves of the bit patterns of |x| for float32 ``x``: high as non-negative int16 (the sign
    bit cleared), low as raw int16 (mask with 0xFFFF after widening). No full-size |x| or int32 copy is made."""
    if row.dtype != torch.float32:
        raise MergelabError(f"radix selection works on float32 magnitudes, got {row.dtype}")
    if sys.byteorder != "little":
        bits = magnitude_bits(row).reshape(-1)
        return (bits >> RADIX_BITS).to(torch.int16), (bits & _LOW_MASK).to(torch.int16)
    halves = row.contiguous().reshape(-1).view(torch.int16)
    return halves[1::2] & 0x7FFF, halves[0::2]


def locate_rank(histogram: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: the bin holding the ``ranks[t]``-th smallest value (1-indexed) and its rank inside that bin."""
    cumulative = histogram.cumsum(1)
    ranks = ranks.to(torch.int64)
    if bool((ranks < 1).any()) or bool((ranks > cumulative[:, -1]).any()):
        raise MergelabError(f"rank(s) {ranks.tolist()} outside 1..{cumulative[:, -1].tolist()} in radix selection")
    bins = (cumulative < ranks.unsqueeze(1)).sum(1)
    before = cumulative.gather(1, (bins - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(bins > 0, before, torch.zeros_like(before))
    return bins, ranks - before


def bits_to_float(high_bins: torch.Tensor, low_bins: torch.Tensor) -> torch.Tensor:
    """The float32 values whose bit patterns are ``high << 16 | low``."""
    bits = (high_bins.to(torch.int64) << RADIX_BITS) | low_bins.to(torch.int64)
    return bits.to(torch.int32).view(torch.float32)


def _radix_select_counts(chunks: Sequence[torch.Tensor], ranks: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`radix_select` plus, per row, how many entries equal the selected value (its low-histogram bin)."""
    rows, device = chunks[0].shape[0], chunks[0].device
    high_hist = torch.zeros(rows, RADIX_BINS, dtype=torch.int64, device=device)
    for chunk in chunks:
        high_hist += radix_histogram(chunk)
    high_bins, within = locate_rank(high_hist, ranks.to(device))
    low_hist = torch.zeros(rows, RADIX_BINS, dtype=torch.int64, device=device)
    for chunk in chunks:
        low_hist += radix_histogram(chunk, high_bins)
    low_bins, rank_among_equals = locate_rank(low_hist, within)
    equal = low_hist.gather(1, low_bins.unsqueeze(1)).squeeze(1)
    return bits_to_float(high_bins, low_bins), rank_among_equals, equal


def radix_select(chunks: Sequence[torch.Tensor], ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row t: the exact ``ranks[t]``-th smallest |x| (1-indexed) over the concatenation of ``chunks`` (each
    ``[T, ...]``), and its rank among the entries equal to it.

    Two streaming passes over the chunks: high 16 bits, then low 16 bits inside the selected high bin. Memory is
    two ``[T, 65536]`` histograms besides the current chunk. (TIES' global scope runs the same two passes as engine
    statistics passes, with the same ``radix_histogram`` / ``locate_rank`` / ``bits_to_float`` steps.)
    """
    values, rank_among_equals, _ = _radix_select_counts(chunks, ranks)
    return values, rank_among_equals


def kth_smallest_magnitude(chunks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Exact k-th smallest |x| (1-indexed) per row over the concatenation of ``chunks`` (each ``[T, ...]``)."""
    rows = chunks[0].shape[0]
    return radix_select(chunks, torch.full((rows,), k, dtype=torch.int64))[0]


# ---------------------------------------------------------------------------------------------------- DARE


def dare_seed(seed: int, model_index: int, name: str) -> int:
    """A 63-bit generator seed that depends only on (seed, model index, tensor name), stable across processes."""
    digest = hashlib.blake2b(f"{seed}\x00{model_index}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_keep_mask(shape: torch.Size | Sequence[int], drop_rate: float, seed: int, model_index: int,
                   name: str) -> torch.Tensor:  # fmt: skip
    """Bernoulli(1 − drop_rate) keep mask: u ~ U[0, 1) from a generator seeded by :func:`dare_seed`, keep u ≥ p."""
    generator = torch.Generator().manual_seed(dare_seed(seed, model_index, name))
    return torch.rand(tuple(shape), generator=generator) >= drop_rate


def dare_drop(tau: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: bool) -> torch.Tensor:
    """τ̃ = m ⊙ τ / (1 − p) (or without the division when ``rescale`` is False), in place on ``tau``."""
    dropped = tau.masked_fill_(~keep, 0.0)
    return dropped.div_(1.0 - drop_rate) if (rescale and drop_rate > 0) else dropped


# ---------------------------------------------------------------------------------------------------- SVD


def rank_from_ratio(shape: Sequence[int], ratio: float) -> int:
    """r = max(1, ⌊ratio · min(m, n)⌋) (CART ``initial_rank_ratio``)."""
    full = min(shape[0], shape[1])
    return min(full, max(1, math.floor(ratio * full)))


def rank_from_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading σ² hold at least ``energy`` of Σσ² (1 for an all-zero spectrum)."""
    squares = singular_values.to(torch.float64) ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    share = squares.cumsum(0) / total
    return min(len(singular_values), int((share < energy).sum()) + 1)


def truncated_svd(matrix: torch.Tensor, rank: int | None = None, energy: float | None = None) -> torch.Tensor:
    """Best rank-r approximation U_r S_r V_rᵀ of a 2-D ``matrix`` (thin SVD in the matrix's dtype).

    Give exactly one of ``rank`` (clipped to min(m, n); full rank returns a copy without an SVD) or ``energy``.
    """
    if (rank is None) == (energy is None):
        raise MergelabError("truncated_svd needs exactly one of rank or energy")
    if matrix.dim() != 2:
        raise MergelabError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    full = min(matrix.shape)
    if rank is not None and rank >= full:
        return matrix.clone()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = max(1, rank) if rank is not None else rank_from_energy(s, energy)  # type: ignore[arg-type]
    return (u[:, :r] * s[:r]) @ vh[:r]
