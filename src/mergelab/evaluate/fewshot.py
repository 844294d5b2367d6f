"""Seeded few-shot sampling of indices from a label vector.

``sample_per_class`` draws exactly k indices per class, stratified by the labels, from one seeded generator
that visits the classes in ascending order and takes the first k items of a random permutation of each class.
So for one seed the k-shot draw is a prefix of the (k+1)-shot draw per class (nested draws, as a k-curve
wants), and the same seed gives the same draw in every protocol (KNN anchors = FT-Classifier refit set for a
given seed and k).
"""

from __future__ import annotations

import torch

from mergelab.core.errors import ConfigError, DataError
from mergelab.core.rng import derive_seed

__all__ = ["derive_seed", "sample_count", "sample_fraction", "sample_per_class"]


def _check_labels(labels: torch.Tensor, what: str) -> torch.Tensor:
    if labels.ndim != 1:
        raise DataError(f"{what}: labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
    if len(labels) == 0:
        raise DataError(f"{what}: the label vector is empty; the split has no examples to sample from")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"{what}: labels must be integer class ids, got dtype {labels.dtype}")
    return labels.detach().cpu().long()


def sample_per_class(
    labels: torch.Tensor, k: int, seed: int, *, num_classes: int | None = None, what: str = "few-shot sample"
) -> torch.Tensor:
    """Indices of exactly ``k`` items per class (ascending index order), drawn with ``seed``.

    Classes are those present in ``labels``, or ``0 .. num_classes-1`` when ``num_classes`` is given (then a
    class missing from ``labels`` is an error). A class with fewer than ``k`` items raises DataError naming
    the class and its size. ``what`` prefixes error messages (e.g. the task and split).
    """
    labels = _check_labels(labels, what)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{what}: shots per class must be a positive integer, got {k!r}")
    present = torch.unique(labels)
    if num_classes is not None:
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise DataError(
                f"{what}: labels must lie in [0, {num_classes}) for a {num_classes}-class head, "
                f"found range [{int(labels.min())}, {int(labels.max())}]"
            )
        classes = list(range(num_classes))
    else:
        classes = [int(c) for c in present]
    generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
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
    """Indices of ``round(fraction * num_items)`` (at least 1) items drawn uniformly without replacement."""
    if num_items < 1:
        raise DataError(f"{what}: there are no items to sample from; the split is empty")
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"{what}: fraction must be in (0, 1], got {fraction!r}")
    count = max(1, round(float(fraction) * num_items))
    return sample_count(num_items, count, seed, what=what)


def sample_count(num_items: int, count: int, seed: int, *, what: str = "sample") -> torch.Tensor:
    """Indices of ``min(count, num_items)`` items drawn uniformly without replacement (ascending order)."""
    if num_items < 1:
        raise DataError(f"{what}: there are no items to sample from; the split is empty")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{what}: the number of samples must be a positive integer, got {count!r}")
    generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
    order = torch.randperm(num_items, generator=generator)
    return torch.sort(order[: min(count, num_items)]).values
