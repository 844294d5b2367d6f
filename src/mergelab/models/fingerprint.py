"""Moved to ``mergelab.io.fingerprint`` (temporary re-export while the bench is restructured)."""

from mergelab.io.fingerprint import checkpoint_fingerprint, state_dict_fingerprint

__all__ = ["checkpoint_fingerprint", "state_dict_fingerprint"]
