"""``open_checkpoint``: any checkpoint mergelab reads, as a lazy per-tensor reader.

The weight formats live in ``formats``, PEFT LoRA adapters in ``adapter``; this module picks one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mergelab.io.adapter import ADAPTER_CONFIG, open_adapter
from mergelab.io.formats import CheckpointReader, SafetensorsReader, StateDictReader, open_weights, read_config

__all__ = ["CheckpointReader", "SafetensorsReader", "StateDictReader", "open_checkpoint", "read_config"]


def open_checkpoint(path: str | os.PathLike[str] | Mapping[str, torch.Tensor], base: object = None) -> CheckpointReader:
    """Open an HF model folder, a .safetensors file, a torch .pt/.bin file, or wrap an in-memory state dict.

    A PEFT LoRA adapter folder (with ``adapter_config.json``) opens as the adapted model in its base's layout; its
    base is ``base`` (a path, state dict or reader) or else the adapter's local ``base_model_name_or_path``.
    ``base`` is ignored for anything that is not an adapter.
    """
    if not isinstance(path, Mapping):
        p = Path(path)
        adapter_dir = p if p.is_dir() else p.parent if p.name.startswith("adapter_model.") else None
        if adapter_dir is not None and (adapter_dir / ADAPTER_CONFIG).is_file():
            return open_adapter(adapter_dir, base)
    return open_weights(path)
