"""Where a run's time goes (stored as its ``timings``), and torch's thread count for a block of work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Timings:
    """Seconds per named stage, summed over every block timed under that name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads inside the block (tiny-tensor protocol work is slower with more threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
