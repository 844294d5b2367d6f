"""mergelab: merge fine-tuned models, then evaluate the merged model honestly.

The public API is imported lazily so that ``import mergelab`` stays cheap and side-effect free.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "merge": ("mergelab.merging.api", "merge"),
    "list_methods": ("mergelab.merging.registry", "list_methods"),
    "open_checkpoint": ("mergelab.io.reader", "open_checkpoint"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")
