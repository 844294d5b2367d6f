"""Small helpers shared by the PLeaS steps: batching and capturing module inputs/outputs with hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mergelab.core.errors import ConfigError, DataError


def iter_batches(
    inputs: torch.Tensor, batch_size: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``inputs`` (in order; the last one may be smaller)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(inputs) == 0:
        raise DataError("no unlabelled inputs were given; pass a non-empty tensor of inputs")
    for count, start in enumerate(range(0, len(inputs), batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        yield inputs[start : start + batch_size]


@contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ``store[name]`` holds the latest output of each named module."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            store[name] = out.detach()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_io(
    model: nn.Module, names: Sequence[str]
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, ``store[name]`` holds (input, output) of the latest call of each named module."""
    modules = dict(model.named_modules())
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            store[name] = (args[0].detach(), out.detach())

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
