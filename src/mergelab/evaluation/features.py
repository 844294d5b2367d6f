"""Feature extraction, computed once: batched, no-grad, eval-mode, cached on disk by content.

Cache key: (encoder content fingerprint, task content hash, split, feature kind, max length, and the autocast
precision when it is not the default fp32, so an fp32 key is the same on every device). Each entry is one
safetensors file (``features`` [N, d] float32, ``labels`` [N] int64, the key fields as metadata) written atomically
(temporary file + ``os.replace``); an unreadable, truncated or mismatching file is recomputed and overwritten.
Every protocol reads these features, so a second protocol, seed or shot count runs no encoder forward pass. The
teacher quantities need no extra entry: a fine-tuned model's logits are ``head(features)`` of its own features.

Encoders: a ``TextEncoder`` (``mergelab.models.hf``: has ``encode_texts``) reads a split's ``texts``; any other
``nn.Module`` maps a batch tensor to [B, d] and reads a split's ``inputs`` tensor (a user task whose splits carry
``inputs`` and ``labels``, with ``content_hash()`` on the task).

Devices: ``FeatureCache(device=...)`` runs the encoder there (moved for the computation and moved back afterwards;
None: wherever the encoder already is); features always come back and are stored on the CPU as float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import (
    DEFAULT_PRECISION,
    DeviceLike,
    autocast,
    autocast_dtype,
    check_precision,
    module_device,
    placed,
    resolve_device,
)
from mergelab.core.errors import ConfigError, DataError
from mergelab.core.progress import progress_bar
from mergelab.evaluation.types import SplitFeatures, TaskFeatures

FORMAT = "mergelab-features-v1"
Advance = Callable[[int], None] | None


def cache_key(fingerprint: str, task_hash: str, split: str, kind: str, max_length: int,
              precision: str = DEFAULT_PRECISION) -> dict[str, str]:  # fmt: skip
    """The fields that identify one cached entry (stored in the file's metadata and hashed into its name); the
    precision is a field only when it is not fp32, so fp32 keys (and files) are those of earlier versions."""
    key = {"format": FORMAT, "encoder": str(fingerprint), "task": str(task_hash), "split": str(split),
           "kind": str(kind), "max_length": str(int(max_length))}  # fmt: skip
    return key if precision == DEFAULT_PRECISION else {**key, "precision": str(precision)}


def cache_file(folder: Path, key: dict[str, str]) -> Path:
    """``folder/<sha256 of the key>.safetensors``."""
    digest = hashlib.sha256("|".join(f"{k}={key[k]}" for k in sorted(key)).encode()).hexdigest()
    return Path(folder) / f"{digest[:40]}.safetensors"


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 256,
                     progress: Advance = None, precision: str = DEFAULT_PRECISION) -> torch.Tensor:  # fmt: skip
    """float32 features [N, d] on the CPU of a user encoder (batch tensor → [B, d]) on ``inputs``, batched, eval,
    no-grad, on the encoder's device (``precision``: autocast there)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    encoder.eval()
    device = module_device(encoder)
    outs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        with autocast(device, precision):
            out = encoder(batch.to(device))
        if out.ndim != 2 or len(out) != len(batch):
            raise ConfigError(
                f"the encoder must map a batch of {len(batch)} inputs to features [B, d]; it returned shape "
                f"{tuple(out.shape)} (flatten or pool inside the encoder)"
            )
        outs.append(out.float().cpu())  # deliberate: features are stored and read by the protocols on the CPU
        if progress is not None:
            progress(len(batch))
    if not outs:
        raise DataError("no inputs to extract features from")
    return torch.cat(outs)


def _is_lazy(encoder: Any) -> bool:
    return callable(encoder) and not isinstance(encoder, torch.nn.Module)


class FeatureCache:
    """Features of encoders on task splits, read from ``folder`` when present and computed (then stored) if not.

    ``computed`` / ``hits`` count the splits this object computed / read from disk. ``device``: where encoders run
    (None: where each already is; ``"auto"``: CUDA, else MPS, else the CPU); ``precision``: fp32 (default) or
    bf16 / fp16 autocast on an accelerator, part of the key when not fp32.
    """

    def __init__(self, folder: str | os.PathLike[str], progress: bool = True, device: DeviceLike | None = None,
                 precision: str = DEFAULT_PRECISION) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.progress = progress
        self.device = None if device is None else resolve_device(device)
        autocast_dtype(precision)  # an unknown precision fails here, before any work
        self.precision = precision if self.device is None else check_precision(self.device, precision)
        self.computed = 0
        self.hits = 0

    def features(self, encoder: Any, fingerprint: str, task: Any, splits: Sequence[str] | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = DEFAULT_MAX_LENGTH, kind: str | None = None) -> TaskFeatures:  # fmt: skip
        """``TaskFeatures`` of ``encoder`` on ``splits`` of ``task`` (default: all its splits), cached on disk.

        ``fingerprint`` is the encoder's content fingerprint (``mergelab.io.fingerprint``). ``encoder`` may be
        a zero-argument callable that builds the encoder: it is called only if some split is not cached (a merged
        encoder is then not even merged on a warm run); pass ``kind`` (the feature, e.g. its pooling) with it.
        """
        if _is_lazy(encoder) and kind is None:
            raise ConfigError("pass kind= (the encoder's feature, e.g. its pooling) with a lazily built encoder")
        kind = kind or getattr(encoder, "pooling", "module")
        names = list(task.splits) if splits is None else list(splits)
        unknown = [s for s in names if s not in task.splits]
        if unknown:
            raise DataError(f"task '{task.name}' has no split(s) {unknown} (has: {', '.join(task.splits)})")
        task_hash = task.content_hash()
        out, built = {}, None
        for split in names:
            key = cache_key(fingerprint, task_hash, split, kind, max_length, self.precision)
            path = cache_file(self.folder, key)
            labels = torch.as_tensor(list(task.splits[split].labels), dtype=torch.int64)
            cached = self._read(path, key, labels)
            if cached is None:
                if built is None:
                    built = encoder() if _is_lazy(encoder) else encoder
                cached = SplitFeatures(self._compute(built, task, split, max_length, batch_size), labels)
                self._write(path, key, cached)
                self.computed += 1
            else:
                self.hits += 1
            out[split] = cached
        return TaskFeatures(task.name, out)

    def _read(self, path: Path, key: dict[str, str], labels: torch.Tensor) -> SplitFeatures | None:
        """The cached split, or None when absent or not exactly this entry (corrupt files are recomputed)."""
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            data = load_file(str(path))
            split = SplitFeatures(data["features"], data["labels"])
            ok = metadata == key and split.features.dtype == torch.float32 and torch.equal(split.labels, labels)
        except Exception as exc:  # truncated, corrupt or foreign file: any failure means "not cached"
            warnings.warn(f"feature cache file {path} is unreadable ({type(exc).__name__}); recomputing", stacklevel=3)
            return None
        return split if ok and bool(torch.isfinite(split.features).all()) else None

    def _write(self, path: Path, key: dict[str, str], split: SplitFeatures) -> None:
        """Atomic write; a cache that cannot be written only costs a recomputation later, so it warns."""
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"features": split.features.contiguous(), "labels": split.labels.contiguous()}, str(tmp),
                      metadata=key)  # fmt: skip
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(f"cannot write the feature cache {path} ({exc}); features are not cached", stacklevel=3)

    def _compute(self, encoder: Any, task: Any, split: str, max_length: int, batch_size: int) -> torch.Tensor:
        if not isinstance(encoder, torch.nn.Module):  # a duck-typed text encoder runs where it runs
            return self._compute_here(encoder, task, split, max_length, batch_size)
        with placed(encoder, self.device):
            check_precision(module_device(encoder), self.precision)
            return self._compute_here(encoder, task, split, max_length, batch_size)

    def _compute_here(self, encoder: Any, task: Any, split: str, max_length: int, batch_size: int) -> torch.Tensor:
        data = task.splits[split]
        with progress_bar(self.progress, f"features {task.name}/{split}", len(data.labels)) as advance:
            if hasattr(encoder, "encode_images"):  # an image encoder decodes and preprocesses one batch at a time
                features = encoder.encode_images(data, batch_size=batch_size, progress=advance,
                                                 precision=self.precision)  # fmt: skip
            elif hasattr(encoder, "encode_texts"):
                features = encoder.encode_texts(list(data.texts), max_length=max_length, batch_size=batch_size,
                                                progress=advance, precision=self.precision)  # fmt: skip
            elif isinstance(encoder, torch.nn.Module):
                inputs = getattr(data, "inputs", None)
                if not isinstance(inputs, torch.Tensor):
                    raise DataError(
                        f"task '{task.name}' split '{split}' has no `inputs` tensor for a tensor encoder; give the "
                        "split an `inputs` attribute or use a text encoder (mergelab.models.hf.load_encoder)"
                    )
                features = extract_features(encoder, inputs, batch_size=batch_size, progress=advance,
                                            precision=self.precision)  # fmt: skip
            else:
                raise ConfigError(f"cannot extract features with a {type(encoder).__name__}; pass an nn.Module")
        if len(features) != len(data.labels):
            raise DataError(f"the encoder gave {len(features)} features for {len(data.labels)} items of '{split}'")
        return features.float().contiguous()
