"""Content fingerprints: cache keys that change whenever the weights (or what the features depend on) change.

Both are sha256 hex digests and independent of where a checkpoint lives on disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mergelab.core.errors import CheckpointError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")
# features depend on the tokenizer as much as on the weights, so its files are part of a checkpoint's identity
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")  # fmt: skip
_BLOCK = 1 << 24


def state_dict_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and raw bytes of every tensor (order of insertion ignored)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 over the weight files, config and tokenizer files of a checkpoint folder (or of one weights file).

    Weight files found recursively (e.g. a multi-task folder's ``heads/``) count with their relative paths; hidden
    files and folders (temporary files, caches) do not count.
    """
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_file():
        files = [path]
    else:
        names = {f for pattern in WEIGHT_PATTERNS for f in path.rglob(pattern)
                 if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)}
        if not names:
            raise CheckpointError(
                f"{path} holds no weight files ({', '.join(WEIGHT_PATTERNS)}); point at a model folder"
            )
        names |= {path / side for side in SIDE_FILES if (path / side).is_file()}
        files = sorted(names)
    digest = hashlib.sha256()
    for file in files:
        relative = file.name if path.is_file() else file.relative_to(path).as_posix()
        digest.update(f"{relative}|{file.stat().st_size}|".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda handle=handle: handle.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()
