"""Seed derivation shared by every layer: one named random stream per purpose, from one run or cell seed."""

from __future__ import annotations

import zlib


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for one random stream (e.g. 'shuffle', 'init', a task name) derived from ``seed`` and a purpose name."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(purpose.encode())) % (1 << 63)
