"""Every seeded sampler of mergelab, on one convention.

Each sampler takes an explicit integer ``seed`` (derive one per named stream with ``mergelab.core.rng.derive_seed``
at the call site), builds its own local generator from it, never reads or changes a global RNG (torch's, numpy's
or Python's), and returns the indices in the documented order (ascending, unless a random order is the point).

Which generator each one uses, and why it stays: the published demo numbers (the text benchmark's table) and the
PLeaS benchmark depend on these exact draws, so each sampler keeps the generator its caller used when those numbers
were measured; moving one to the other library would change every few-shot set, split or subset.

=======================  =======  ===================================================================================
sampler                  library  used by
=======================  =======  ===================================================================================
``sample_per_class``     torch    protocols' k-shot draws (KNN anchors, FT-Classifier inputs, linear-probe data)
``sample_count``         torch    Surgery's k × C eval inputs, ``sample_fraction``
``sample_fraction``      torch    FT-Classifier's transductive CV variant (a fraction of the eval split)
``permutation``          torch    PLeaS calibration images (a shuffled order)
``stratified_split``     numpy    built-in tasks' train / validation / test splits (``data.catalog``)
``stratified_subsample`` numpy    experts' training subsets (``finetune.experts``)
``per_class_subset``     numpy    the benchmark's few-shot pool (``bench.pool.fewshot_pool``)
``uniform_subset``       numpy    learned methods' example subsets (``learned.base.sample_indices``); PLeaS's
                                  Fashion-MNIST subsample
``stratified_holdout``   numpy    PLeaS's MNIST train / test split
=======================  =======  ===================================================================================

The torch samplers are nested in their size for one seed (a k-shot draw is a prefix, per class, of the (k+1)-shot
draw) because they take prefixes of one random permutation per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mergelab.core.errors import ConfigError, DataError

__all__ = [
    "per_class_subset",
    "permutation",
    "sample_count",
    "sample_fraction",
    "sample_per_class",
    "stratified_holdout",
    "stratified_split",
    "stratified_subsample",
    "uniform_subset",
]

# ----------------------------------------------------------------------------------------------- torch samplers


def _torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (1 << 63))


def _check_labels(labels: torch.Tensor, what: str) -> torch.Tensor:
    if labels.ndim != 1:
        raise DataError(f"{what}: labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
    if len(labels) == 0:
        raise DataError(f"{what}: the label vector is empty; the split has no examples to sample from")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"{what}: labels must be integer class ids, got dtype {labels.dtype}")
    return labels.detach().cpu().long()


def _classes(labels: torch.Tensor, num_classes: int | None, what: str) -> list[int]:
    """The classes present in ``labels``, or ``0 .. num_classes-1`` (labels must then lie in that range)."""
    if num_classes is None:
        return [int(c) for c in torch.unique(labels)]
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(
            f"{what}: labels must lie in [0, {num_classes}) for a {num_classes}-class head, "
            f"found range [{int(labels.min())}, {int(labels.max())}]"
        )
    return list(range(num_classes))


def sample_per_class(
    labels: torch.Tensor, k: int, seed: int, *, num_classes: int | None = None, what: str = "few-shot sample"
) -> torch.Tensor:
    """Indices of exactly ``k`` items per class (ascending index order), drawn with ``seed`` (torch generator).

    One generator visits the classes in ascending order and takes the first ``k`` items of a random permutation of
    each class, so for one seed the k-shot draw is a prefix of the (k+1)-shot draw per class, and the same seed
    gives the same draw in every protocol (KNN anchors = FT-Classifier refit set for a given seed and k).
    Classes are those present in ``labels``, or ``0 .. num_classes-1`` when ``num_classes`` is given (then a
    class missing from ``labels`` is an error). A class with fewer than ``k`` items raises DataError naming the
    class and its size. ``what`` prefixes error messages (e.g. the task and split).
    """
    labels = _check_labels(labels, what)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{what}: shots per class must be a positive integer, got {k!r}")
    classes = _classes(labels, num_classes, what)
    generator = _torch_generator(seed)
    chosen = []
    for c in classes:
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        if len(members) < k:
            raise DataError(
                f"{what}: class {c} has only {len(members)} example(s) but {k} per class were asked for; "
                f"lower the shots to at most {len(members)} or add examples of class {c}"
            )
        order = torch.randperm(len(members), generator=generator)
        chosen.append(members[order[:k]])
    return torch.sort(torch.cat(chosen)).values


def sample_fraction(num_items: int, fraction: float, seed: int, *, what: str = "sample") -> torch.Tensor:
    """Indices of ``round(fraction * num_items)`` (at least 1) items drawn uniformly without replacement
    (ascending order; torch generator, the draw of ``sample_count``)."""
    if num_items < 1:
        raise DataError(f"{what}: there are no items to sample from; the split is empty")
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"{what}: fraction must be in (0, 1], got {fraction!r}")
    count = max(1, round(float(fraction) * num_items))
    return sample_count(num_items, count, seed, what=what)


def sample_count(num_items: int, count: int, seed: int, *, what: str = "sample") -> torch.Tensor:
    """Indices of ``min(count, num_items)`` items drawn uniformly without replacement (ascending order): the
    first ``count`` entries of a seeded ``torch.randperm``."""
    if num_items < 1:
        raise DataError(f"{what}: there are no items to sample from; the split is empty")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{what}: the number of samples must be a positive integer, got {count!r}")
    order = torch.randperm(num_items, generator=_torch_generator(seed))
    return torch.sort(order[: min(count, num_items)]).values


def permutation(num_items: int, seed: int) -> torch.Tensor:
    """A seeded random order of ``range(num_items)`` (``torch.randperm``; int64), e.g. to shuffle a pool."""
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise ConfigError(f"the number of items to shuffle must be a non-negative integer, got {num_items!r}")
    return torch.randperm(num_items, generator=_torch_generator(seed))


# ----------------------------------------------------------------------------------------------- numpy samplers


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


def stratified_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint stratified index sets of the given sizes (each capped by what is left), each sorted; numpy
    generator.

    Every class (ascending) is shuffled once; each part then takes its proportional share of every class in turn
    (largest remainders), so parts never overlap and class proportions are preserved up to rounding.
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


def stratified_subsample(labels: Sequence[int] | np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified random subset of size min(n, len(labels)): ``stratified_split``'s first part."""
    return stratified_split(labels, [n], seed)[0]


def per_class_subset(labels: Sequence[int] | np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of up to ``per_class`` items of every class (all of a smaller class); numpy generator.

    The classes are visited in ascending order and each takes the first ``per_class`` items of a random permutation
    of its members, from one generator (the benchmark's few-shot pool).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ConfigError(f"the number of items per class must be a positive integer, got {per_class!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in sorted(set(labels.tolist()))]
    return np.sort(np.concatenate(keep)) if keep else np.array([], dtype=np.int64)


def uniform_subset(total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a uniform subset of size min(n, total) of ``range(total)``, all of them when ``n`` is None
    (``Generator.choice`` without replacement; numpy generator)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise ConfigError(f"the subset size must be a non-negative integer or None, got {n!r}")
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=int(n), replace=False))


def stratified_holdout(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``round(fraction · size)`` items of every class held out as test (sorted), the rest
    as train in a random order (so any prefix of it is a uniform subsample); one numpy generator, classes
    ascending, then the train shuffle."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the held-out fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        held.append(rng.permutation(idx)[: int(round(len(idx) * fraction))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(held)] = True
    return rng.permutation(np.flatnonzero(~is_test)), np.flatnonzero(is_test)
