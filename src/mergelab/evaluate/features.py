"""Feature extraction, computed once: batched, no-grad, eval-mode, cached on disk by content.

Cache key: (encoder fingerprint, task content hash, split, feature kind, max length). Files are safetensors written
atomically (temporary file + rename); a corrupt or unreadable cache file is recomputed and overwritten. Every
protocol reads these features, so a second protocol, seed or shot count runs no encoder forward pass.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mergelab.evaluate.types import SplitFeatures, TaskFeatures
from mergelab.progress import progress_bar


def cache_file(folder: Path, fingerprint: str, task_hash: str, split: str, kind: str, max_length: int) -> Path:
    key = hashlib.sha256(f"{fingerprint}|{task_hash}|{split}|{kind}|{max_length}".encode()).hexdigest()[:32]
    return folder / f"{key}.safetensors"


class FeatureCache:
    """On-disk cache of encoder features per (encoder, task, split); ``forward_passes`` counts encoder batches."""

    def __init__(self, folder: str | os.PathLike[str], progress: bool = True) -> None:
        self.folder = Path(folder)
        self.progress = progress
        self.computed = 0  # splits computed (not read from the cache) by this object

    def features(self, encoder: Any, fingerprint: str, task: Any, splits: tuple[str, ...] = ("train", "test"),
                 max_length: int = 128, batch_size: int = 64, kind: str | None = None) -> TaskFeatures:  # fmt: skip
        """Features of ``encoder`` on ``splits`` of ``task`` (a TextTask), from the cache when present.

        ``encoder`` may be a zero-argument callable that builds the encoder: it is only called when a split is
        missing from the cache (a merged encoder then need not even be merged on a warm run). ``kind`` names the
        feature (the pooling); pass it with a lazy encoder.
        """
        kind = kind or getattr(encoder, "pooling", type(encoder).__name__)
        task_hash = task.content_hash()
        out = {}
        built = None
        for split in splits:
            path = cache_file(self.folder, fingerprint, task_hash, split, kind, max_length)
            cached = self._read(path, len(task.splits[split]))
            if cached is None:
                if built is None:
                    built = encoder() if callable(encoder) and not isinstance(encoder, torch.nn.Module) else encoder
                cached = self._compute(built, task, split, max_length, batch_size)
                self._write(path, cached)
                self.computed += 1
            out[split] = cached
        return TaskFeatures(task.name, out)

    def _read(self, path: Path, expected_rows: int) -> SplitFeatures | None:
        if not path.exists():
            return None
        try:
            data = load_file(str(path))
            split = SplitFeatures(data["features"], data["labels"])
        except Exception:  # corrupt or truncated: recompute
            return None
        return split if len(split) == expected_rows else None

    def _write(self, path: Path, split: SplitFeatures) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            save_file({"features": split.features.contiguous(), "labels": split.labels.contiguous()}, str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _compute(self, encoder: Any, task: Any, split: str, max_length: int, batch_size: int) -> SplitFeatures:
        data = task.splits[split]
        with progress_bar(self.progress, f"features {task.name}/{split}", len(data)) as advance:
            features = encoder.encode_texts(data.texts, max_length=max_length, batch_size=batch_size, progress=advance)
        return SplitFeatures(features.float(), torch.tensor(data.labels, dtype=torch.int64))


def extract_features(encoder: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of a plain torch encoder on tensor inputs (users' own architectures), batched and no-grad."""
    encoder.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            outs.append(encoder(inputs[start : start + batch_size]).float())
    return torch.cat(outs) if outs else torch.empty(0, 0)
