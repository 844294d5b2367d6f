"""Exceptions with messages that name the problem and the fix."""

from __future__ import annotations


class MergelabError(Exception):
    """Base class: every error mergelab raises on bad input is one of these."""


class CheckpointError(MergelabError):
    """A checkpoint is missing, unreadable, corrupt, unsafe, or inconsistent with the others."""


class ConfigError(MergelabError):
    """A method, parameter, or config value is unknown or out of range."""


class DataError(MergelabError):
    """A task's data is missing, empty, or inconsistent (labels, splits, shot counts)."""


class OutputError(MergelabError):
    """An output (checkpoint, result or cache file) could not be written: a full disk, no permission."""
