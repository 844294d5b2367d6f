"""Where mergelab keeps what it caches."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$MERGELAB_CACHE, else $XDG_CACHE_HOME/mergelab, else ~/.cache/mergelab."""
    if os.environ.get("MERGELAB_CACHE"):
        return Path(os.environ["MERGELAB_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mergelab"
