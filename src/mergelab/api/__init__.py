"""The public API: ``merge`` (every method, one entry point), the method registry, and ``MergeResult``."""

from mergelab.api.entry import MergeResult, merge, merge_experts
from mergelab.api.registry import build_method, get_method_spec, list_methods

__all__ = ["MergeResult", "build_method", "get_method_spec", "list_methods", "merge", "merge_experts"]
