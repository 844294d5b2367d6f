"""Checkpoints named by a local path or a Hugging Face Hub id, resolved to a local folder.

A reference that exists on disk is used as it is; one that looks like a Hub id (``name`` or ``org/name``, no such
local path) is downloaded with ``huggingface_hub.snapshot_download`` (or read from its cache when offline); anything
else is a local path that does not exist. Each failure is one ``CheckpointError`` saying what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from mergelab.core.errors import CheckpointError

HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")
# weights in formats mergelab never reads: not worth downloading
IGNORED_FILES = ("*.h5", "*.msgpack", "*.onnx", "onnx/*", "*.ot", "*.tflite", "openvino/*", "coreml/*")


def looks_like_hub_id(reference: str) -> bool:
    """Whether ``reference`` has the shape of a Hub repo id (``name`` or ``org/name``; no ``./``, ``~``, ``..``)."""
    return bool(HUB_ID.match(reference)) and ".." not in reference and not reference.endswith((".", "-"))


def download_hint(repo_id: str) -> str:
    """What to do on a machine without the Hub: download elsewhere and give the folder."""
    return f"download it elsewhere with `huggingface-cli download {repo_id} --local-dir DIR` and give the folder"


def download_checkpoint(repo_id: str, what: str = "checkpoint") -> Path:
    """The local snapshot folder of Hub repo ``repo_id`` (downloaded, or from the Hub cache when offline)."""
    try:
        from huggingface_hub import snapshot_download  # lazy: only for checkpoints given as Hub ids
    except ImportError:
        raise CheckpointError(f"{what} '{repo_id}' is not a local path and huggingface_hub is not installed; "
                              f"pip install huggingface_hub, or {download_hint(repo_id)}") from None  # fmt: skip
    try:
        return Path(snapshot_download(repo_id, ignore_patterns=list(IGNORED_FILES)))
    except Exception as exc:  # offline, unknown repo, gated repo, network errors: all say the same thing to do
        raise CheckpointError(
            f"{what} '{repo_id}' is no local path and cannot be downloaded from the Hugging Face Hub (offline? "
            f"{type(exc).__name__}); {download_hint(repo_id)}"
        ) from exc


def resolve_checkpoint(reference: str, what: str = "checkpoint") -> Path:
    """A local folder for ``reference``: an existing path as it is, a Hub id downloaded; otherwise an error."""
    path = Path(reference).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(reference):
        raise CheckpointError(f"{what} {reference} does not exist; check the path (or give a Hub id such as org/name)")
    return download_checkpoint(reference, what)
