"""Which tensors merge. Explicit include/exclude regexes; heads and integer/bool buffers never merge by default."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mergelab.core.errors import ConfigError

DEFAULT_EXCLUDE = (r"(^|\.)classifier\.", r"(^|\.)score\.", r"(^|\.)pre_classifier\.")


@dataclass(frozen=True)
class TensorSelection:
    """A tensor merges when its dtype is floating, it matches an ``include`` regex (``re.search``) and no
    ``exclude`` regex. Everything else is copied from the base (heads stay with their fine-tuned models)."""

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid tensor pattern {pattern!r}: {exc}") from None

    def merges(self, name: str, dtype: torch.dtype) -> bool:
        if not (dtype.is_floating_point or dtype.is_complex):
            return False
        if not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)
