"""mergelab: merge fine-tuned models, then evaluate the merged model honestly.

The public API is imported lazily so that ``import mergelab`` stays cheap and side-effect free:
``mergelab.merge`` (every method, one entry point; returns a ``MergeResult``), ``mergelab.list_methods`` /
``mergelab.get_method_spec`` (the registry), ``mergelab.evaluate`` (every protocol on one encoder; returns
``ResultRow``s) and ``mergelab.open_checkpoint``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "merge": ("mergelab.api", "merge"),
    "MergeResult": ("mergelab.api", "MergeResult"),
    "list_methods": ("mergelab.api", "list_methods"),
    "get_method_spec": ("mergelab.api", "get_method_spec"),
    "evaluate": ("mergelab.evaluation.api", "evaluate"),
    "ResultRow": ("mergelab.evaluation.results", "ResultRow"),
    "open_checkpoint": ("mergelab.io.reader", "open_checkpoint"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")
