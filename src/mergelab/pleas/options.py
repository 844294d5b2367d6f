"""Validated settings of a PLeaS merge (``PleasOptions``): one object instead of a dozen positional parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mergelab.core.config import CheckedModel


class PleasOptions(CheckedModel):
    """How ``pleas_merge`` matches, refits and re-estimates (the budget and the matching are its own arguments).

    ``similarity``: activation similarity (``distance``, the PLeaS default, or ``correlation``); ``priority``:
    groups that get separate units first (default: deepest group first); ``batch_size`` / ``max_batches``: passes over
    the unlabelled inputs; ``ridge``: least-squares ridge (× the mean Gram diagonal); ``positions_per_image``:
    conv positions per image in least squares (None: all); ``least_squares`` / ``reestimate_bn``: run steps 2 / 3
    (off for ablations and tests); ``max_iter``: weight-matching sweeps; ``seed``: weight matching's group order
    and least squares' position subsample.
    """

    similarity: Literal["distance", "correlation"] = "distance"
    priority: tuple[str, ...] | None = None
    batch_size: int = Field(64, ge=1)
    max_batches: int | None = Field(None, ge=1)
    ridge: float = Field(1e-4, ge=0)
    positions_per_image: int | None = Field(None, ge=1)
    least_squares: bool = True
    reestimate_bn: bool = True
    max_iter: int = Field(100, ge=1)
    seed: int = 0
