"""Content fingerprints: cache keys that change whenever the weights change."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "model.safetensors.index.json", "config.json")


def state_dict_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 over the weight files and config of a checkpoint folder (or of a single weights file)."""
    path = Path(folder)
    files = [path] if path.is_file() else sorted({f for p in WEIGHT_PATTERNS for f in path.glob(p)})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
