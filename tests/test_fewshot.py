"""Few-shot sampling: exact k per class, stratified, seeded, nested, and clear errors."""

from __future__ import annotations

import pytest
import torch

from mergelab.core.errors import ConfigError, DataError
from mergelab.core.rng import derive_seed
from mergelab.core.sampling import sample_count, sample_fraction, sample_per_class


def labels_of(sizes: dict[int, int]) -> torch.Tensor:
    """Shuffled labels with ``sizes[c]`` items of class c."""
    labels = torch.cat([torch.full((n,), c) for c, n in sizes.items()])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(123))]


def test_exactly_k_per_class_and_sorted_unique():
    labels = labels_of({0: 10, 1: 7, 2: 12})
    index = sample_per_class(labels, 5, seed=0)
    assert index.dtype == torch.int64
    assert torch.equal(index, torch.sort(index).values) and len(torch.unique(index)) == len(index)
    assert torch.bincount(labels[index]).tolist() == [5, 5, 5]


def test_same_seed_same_draw_other_seed_other_draw():
    labels = labels_of({0: 30, 1: 30, 2: 30})
    a = sample_per_class(labels, 3, seed=7)
    assert torch.equal(a, sample_per_class(labels, 3, seed=7))
    assert not torch.equal(a, sample_per_class(labels, 3, seed=8))


def test_draws_are_nested_in_k_for_one_seed():
    labels = labels_of({0: 20, 1: 20})
    small, large = (
        set(sample_per_class(labels, 2, seed=3).tolist()),
        set(sample_per_class(labels, 6, seed=3).tolist()),
    )
    assert small < large


def test_draw_covers_the_class_members_uniformly():
    # over many seeds every member of a class gets picked: the draw is not a fixed prefix
    labels = labels_of({0: 6, 1: 6})
    seen = set()
    for seed in range(40):
        seen.update(sample_per_class(labels, 1, seed=seed).tolist())
    assert seen == set(range(12))


def test_k_larger_than_a_class_names_the_class_and_its_size():
    labels = labels_of({0: 10, 1: 3, 2: 10})
    with pytest.raises(DataError, match=r"class 1 has only 3 example"):
        sample_per_class(labels, 5, seed=0)


def test_num_classes_requires_every_class():
    labels = labels_of({0: 5, 2: 5})
    assert sample_per_class(labels, 2, seed=0).numel() == 4  # classes present only
    with pytest.raises(DataError, match=r"class 1 has only 0 example"):
        sample_per_class(labels, 2, seed=0, num_classes=3)
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        sample_per_class(labels, 2, seed=0, num_classes=2)


def test_empty_and_bad_inputs():
    with pytest.raises(DataError, match="empty"):
        sample_per_class(torch.empty(0, dtype=torch.long), 1, seed=0)
    with pytest.raises(DataError, match="integer"):
        sample_per_class(torch.tensor([0.0, 1.0]), 1, seed=0)
    with pytest.raises(ConfigError, match="positive integer"):
        sample_per_class(torch.tensor([0, 1]), 0, seed=0)
    with pytest.raises(DataError, match="empty"):
        sample_fraction(0, 0.5, seed=0)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        sample_fraction(10, 1.5, seed=0)


def test_sample_fraction_and_count():
    index = sample_fraction(200, 0.1, seed=1)
    assert len(index) == 20 and len(torch.unique(index)) == 20 and int(index.max()) < 200
    assert torch.equal(index, sample_fraction(200, 0.1, seed=1))
    assert not torch.equal(index, sample_fraction(200, 0.1, seed=2))
    assert len(sample_fraction(50, 0.001, seed=0)) == 1  # at least one item
    assert len(sample_count(5, 10, seed=0)) == 5  # capped at the number of items


def test_derive_seed_separates_purposes_and_seeds():
    assert derive_seed(0, "a") != derive_seed(0, "b")
    assert derive_seed(0, "a") != derive_seed(1, "a")
    assert derive_seed(5, "a") == derive_seed(5, "a")
