"""Zero-shot heads of CLIP models (HF CLIP and open_clip), computed once and cached on disk by content.

Each image task's head is built from the *pretrained* text tower (``text_source``; default: each model's own):
every class name through every prompt template, averaged and normalised, times the logit scale
(``models.vision.zero_shot_weights``, ``models.open_clip.OpenClipTextTower``). ``ZeroShotHeads`` loads each text
tower at most once (and not at all when every head is cached) and stores each head as one safetensors file
(``weights`` [C, d] float32, the key as metadata) in its folder — by default ``zero_shot_heads/`` inside the
feature cache — written atomically (``io.writer.atomic_write_bytes``). Key: the text checkpoint's content
fingerprint, the class names, the templates and the dtype; an unreadable or mismatching file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from mergelab.core.errors import OutputError
from mergelab.evaluation.features import cache_file
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import atomic_write_bytes
from mergelab.models import open_clip, vision
from mergelab.models.loading import load_task_model, model_type
from mergelab.models.task_model import TaskModel

HEAD_FORMAT = "mergelab-zero-shot-head-v1"
HEAD_DTYPE = "float32"
HEADS_FOLDER = "zero_shot_heads"
PathLike = str | os.PathLike[str]


def clip_kind(path: PathLike) -> str | None:
    """``"open_clip"`` for an open_clip folder, ``"clip"`` for an HF CLIP folder, None for any other model."""
    if open_clip.is_open_clip_folder(path):
        return "open_clip"
    return "clip" if model_type(path) == "clip" else None


def text_fingerprint(source: PathLike) -> str:
    """The content fingerprint of a text checkpoint (an open_clip folder's config counts too: it names the
    tokenizer and the context length)."""
    fingerprint = checkpoint_fingerprint(source)
    config = Path(source) / open_clip.OPEN_CLIP_CONFIG
    if not config.is_file():
        return fingerprint
    return hashlib.sha256(fingerprint.encode() + b"|" + config.read_bytes()).hexdigest()


def head_key(fingerprint: str, class_names: Sequence[str], templates: Sequence[str]) -> dict[str, str]:
    """The fields that identify one cached head (its file's metadata, hashed into its name)."""
    return {"format": HEAD_FORMAT, "text": str(fingerprint), "classes": json.dumps([str(n) for n in class_names]),
            "templates": json.dumps(list(templates)), "dtype": HEAD_DTYPE}  # fmt: skip


def read_head(path: Path, key: dict[str, str]) -> torch.Tensor | None:
    """The cached weights [C, d], or None when absent, unreadable or not exactly this entry."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(str(path))["weights"]
    except Exception as exc:  # truncated, corrupt or foreign file: any failure means "not cached"
        warnings.warn(f"zero-shot head cache file {path} is unreadable ({type(exc).__name__}); recomputing",
                      stacklevel=3)  # fmt: skip
        return None
    rows = len(json.loads(key["classes"]))
    ok = metadata == key and weights.dtype == torch.float32 and weights.ndim == 2 and len(weights) == rows
    return weights if ok and bool(torch.isfinite(weights).all()) else None


def write_head(path: Path, key: dict[str, str], weights: torch.Tensor) -> None:
    """Atomic write; a head that cannot be cached only costs a recomputation later, so it warns."""
    try:
        atomic_write_bytes(path, save({"weights": weights.contiguous()}, metadata=key))
    except OutputError as exc:
        warnings.warn(f"the zero-shot head is not cached: {exc}", stacklevel=3)


def load_text_tower(source: PathLike) -> Any:
    """The text tower of the pretrained CLIP ``source`` (HF CLIP or open_clip): ``class_weights(names, templates)``."""
    if open_clip.is_open_clip_folder(source):
        return open_clip.load_open_clip_text(source)
    return vision.load_clip_text(source)


class ZeroShotHeads:
    """Zero-shot head weights by content: read from ``folder`` when cached, else built with the text tower of
    ``text_source`` (None: each model's own), each tower loaded at most once. ``computed`` / ``hits`` count the
    heads this object built / read from disk; ``loaded`` the text towers it loaded."""

    def __init__(self, folder: PathLike, text_source: PathLike | None = None,
                 templates: Sequence[str] = vision.DEFAULT_TEMPLATES) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.text_source = None if text_source is None else Path(text_source)
        self.templates = vision.check_templates(templates)
        self._towers: dict[Path, Any] = {}
        self._fingerprints: dict[Path, str] = {}
        self.computed = self.hits = self.loaded = 0

    def weights(self, model: PathLike, class_names: Sequence[str]) -> torch.Tensor:
        """[C, d] float32 zero-shot weights of ``class_names`` for the CLIP model folder ``model``."""
        source = self.text_source or Path(model)
        if source not in self._fingerprints:
            self._fingerprints[source] = text_fingerprint(source)
        key = head_key(self._fingerprints[source], class_names, self.templates)
        path = cache_file(self.folder, key)
        cached = read_head(path, key)
        if cached is not None:
            self.hits += 1
            return cached
        weights = self.tower(source).class_weights([str(n) for n in class_names], self.templates)
        weights = weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        write_head(path, key, weights)
        self.computed += 1
        return weights

    def tower(self, source: Path) -> Any:
        """The text tower of ``source``, loaded on first use."""
        if source not in self._towers:
            self._towers[source] = load_text_tower(source)
            self.loaded += 1
        return self._towers[source]

    def task_model(self, path: PathLike, label_names: Sequence[str]) -> TaskModel:
        """The CLIP (or open_clip) folder ``path`` as the vision tower + the cached zero-shot head of
        ``label_names``; any other model folder through ``models.loading.load_task_model``."""
        kind = clip_kind(path)
        if kind is None:
            return load_task_model(path, label_names=label_names)
        build = open_clip.open_clip_task_model if kind == "open_clip" else vision.clip_task_model
        return build(path, [str(n) for n in label_names], self.weights(path, label_names))
