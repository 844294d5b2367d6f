"""Seeded, class-stratified splitting and subsampling as pure functions on label arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes proportionally to ``counts`` (largest remainders), never above a class's count."""
    total = counts.sum()
    n = min(n, int(total))
    exact = counts * n / total
    take = np.minimum(np.floor(exact).astype(int), counts)
    remainder = n - take.sum()
    order = np.argsort(-(exact - take), kind="stable")
    for cls in order:
        if remainder <= 0:
            break
        if take[cls] < counts[cls]:
            take[cls] += 1
            remainder -= 1
    return take


def stratified_subsample(labels: Sequence[int] | np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified random subset of size min(n, len(labels)), deterministic in ``seed``."""
    return stratified_split(labels, [n], seed)[0]


def stratified_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint stratified index sets of the given sizes (each capped by what is left), deterministic in ``seed``.

    Every class is shuffled once; each part then takes its proportional share of every class in turn, so parts
    never overlap and class proportions are preserved up to rounding.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {int(c): rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    parts = []
    for size in sizes:
        counts = np.array([len(pools[int(c)]) for c in classes])
        if counts.sum() == 0:
            parts.append(np.array([], dtype=int))
            continue
        take = _allocate(counts, size)
        chosen: list[int] = []
        for cls, k in zip(classes, take, strict=True):
            chosen += pools[int(cls)][:k]
            pools[int(cls)] = pools[int(cls)][k:]
        parts.append(np.sort(np.array(chosen, dtype=int)))
    return parts
