"""Fused elementwise steps: one function per step, compiled by ``torch.compile`` into a single loop where it can be
(on CPU a chunk of TIES costs ≈ 2 ns per position fused against ≈ 24 ns as ~50 separate torch ops), and run
eagerly, with the same arithmetic, where it can't (no C++ compiler, an unsupported device, ``MERGELAB_COMPILE=0``).

Compilation happens at the first call (or on a background thread from ``warm_up``), not at import: ≈ 30 s the first
time on a machine, ≈ 3-4 s in a later process (inductor's on-disk cache), and is shared by every tensor of a merge
(sizes are symbolic).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

COMPILE_ENV = "MERGELAB_COMPILE"  # "0": never compile (run the fused steps eagerly)
SMALL_CHUNK = 64  # chunks shorter than this run eagerly (no recompilation for sizes 0 and 1)
# First compile setting: trust the CPU's vector ISA flags instead of probing each ISA by building and loading a test
# library in a child process (≈ 2 s of every process's first compile here); where that build fails, the second
# setting probes as usual.
TRUSTED_ISA: dict[str, Any] = {"cpp.vec_isa_ok": True}


class TiesStepResult(NamedTuple):
    """What :func:`ties_step` computed for one chunk (None: not asked for)."""

    result: torch.Tensor | None
    open: torch.Tensor | None
    kept: torch.Tensor | None
    signs: torch.Tensor | None


TiesOutputs = Literal["merge", "bracket", "count"]


def ties_step(base: torch.Tensor | None, models: Sequence[torch.Tensor], high: torch.Tensor, low_cut: torch.Tensor,
              scales: torch.Tensor, outer: torch.Tensor, majority: torch.Tensor, mean: bool,
              outputs: TiesOutputs = "merge") -> TiesStepResult:  # fmt: skip
    """One chunk of TIES against per-row bounds (``high``, ``low_cut``, ``scales`` are ``[T]``; ``outer`` and
    ``majority`` 0-d).

    τ_t = models[t] − base (``base`` None: ``models`` are τ_t); τ̂_t = τ_t · [|τ_t| > high_t] · λ_t; S = Σ_t τ̂_t in
    row order; γ = sign(S), with S = 0 taking ``majority``; merged = the sum of the τ̂_t agreeing with γ (or their
    mean over max(count, 1) when ``mean``); result = base + outer · merged (outer · merged without a base).

    ``open`` is non-zero (Σ_t of those |τ_t|) exactly where some low_cut_t < |τ_t| ≤ high_t, with low_cut_t ≥ 0 (a
    trim not yet decided when the bounds bracket κ_t; a float, as a bool output costs the fused loop 4× on CPU),
    ``kept[t]`` counts |τ_t| > high_t, and ``signs`` is Σ sign(S) over the positions not open. ``outputs`` names
    which are computed (the others are None): ``"merge"`` the result; ``"bracket"`` the result, open and kept;
    ``"count"`` open, kept and signs. Each set compiles to its own single loop: asking for all four at once made
    inductor split the loop and cost 3× (14.8 against 5.2 ms per 4M entries here). The arithmetic is that of the
    eager TIES path (trim by multiplying with a 0/1 gate, the sides summed in row order), so the values agree with it.
    """
    rows, kept, open_ = [], [], None
    for t, model in enumerate(models):
        tau = model - base if base is not None else model
        magnitude = tau.abs()
        keep = (magnitude > high[t]).to(tau.dtype)
        if outputs != "merge":
            band = torch.where((magnitude > low_cut[t]) & (magnitude <= high[t]), magnitude, 0.0)
            open_ = band if open_ is None else open_ + band
            kept.append(keep.sum())
        rows.append(tau * keep * scales[t])
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    signs = torch.sign(total)
    counts = torch.stack(kept) if kept else None
    if outputs == "count":
        certain = torch.where(open_ > 0, torch.zeros_like(signs), signs).sum()  # type: ignore[operator]
        return TiesStepResult(None, open_, counts, certain)
    positive, negative, plus, minus = None, None, None, None
    for row in rows:
        up = row.clamp(min=0)
        down = row - up
        positive = up if positive is None else positive + up
        negative = down if negative is None else negative + down
        if mean:
            above, below = (row > 0).to(row.dtype), (row < 0).to(row.dtype)
            plus = above if plus is None else plus + above
            minus = below if minus is None else minus + below
    if mean:
        positive = positive / plus.clamp(min=1)  # type: ignore[union-attr,operator]
        negative = negative / minus.clamp(min=1)  # type: ignore[union-attr,operator]
    elected = torch.where(signs == 0, majority, signs)
    merged = torch.where(elected > 0, positive, torch.where(elected < 0, negative, torch.zeros_like(total)))  # type: ignore[arg-type]
    merged = merged * outer
    result = base + merged if base is not None else merged
    return TiesStepResult(result, open_, counts, None)


class FusedStep:
    """A fused step: compiled at its first call (once per instance) or ahead of it by :meth:`warm_up`, eager where
    compiling fails or is switched off (``MERGELAB_COMPILE=0``), with one warning naming why. A warm-up pays only
    where the calling thread meanwhile runs few, large torch operations (global TIES' sample pass): run beside eager
    chunk loops, which take the GIL between every small operation, a compilation took 10.6 s against 6.3 s alone."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self._compiled: Callable[..., Any] | None = None
        self._enabled = os.environ.get(COMPILE_ENV, "1") != "0"
        self._options: list[dict[str, Any]] = [dict(TRUSTED_ISA), {}]  # compile settings still to try, in order
        self._warming: threading.Thread | None = None

    @property
    def compiling(self) -> bool:
        return self._enabled

    def warm_up(self, *examples: tuple[Any, ...]) -> None:
        """Compile for each example argument tuple on a background thread, so that the compilation overlaps the
        caller's other work (the next call waits for it). Examples must match the later calls in everything but
        sizes (devices, dtypes, which tensors are None, the Python values), or those calls compile again."""
        if not self._enabled or self._warming is not None:
            return
        self._warming = threading.Thread(target=lambda: [self._call_compiled(args) for args in examples],
                                         name="mergelab-compile", daemon=True)  # fmt: skip
        self._warming.start()

    def __call__(self, size: int, *args: Any) -> Any:
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        if not self._enabled or size < SMALL_CHUNK:
            return self.function(*args)
        return self._call_compiled(args)

    def _call_compiled(self, args: tuple[Any, ...]) -> Any:
        while True:
            if self._compiled is None:
                self._compiled = torch.compile(self.function, dynamic=True, options=self._options.pop(0))
            try:
                return self._compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: other settings, then eager
                self._compiled = None
                if not self._options:
                    return self._run_eagerly(exc, args)

    def _run_eagerly(self, exc: Exception, args: tuple[Any, ...]) -> Any:
        self._enabled = False
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"could not compile the fused {self.function.__name__} ({reason[:200]}); running it "
                      f"eagerly (slower, same results); set {COMPILE_ENV}=0 to skip the attempt",
                      RuntimeWarning, stacklevel=4)  # fmt: skip
        return self.function(*args)
