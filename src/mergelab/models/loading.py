"""One door for loading task models and encoders, text or image: dispatches on the fine-tuned model's config.

Text classifiers (and mergelab's pooled classifiers) go to :mod:`mergelab.models.hf`, HF image classifiers to
:mod:`mergelab.models.vision`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.models import hf, vision
from mergelab.models.task_model import TaskModel

PathLike = str | os.PathLike[str]


def is_image_model(path: PathLike) -> bool:
    """Whether the model folder ``path`` holds an HF image classifier (read from its config.json only)."""
    config = Path(path) / "config.json"
    if not config.is_file() or hf.is_pooled_classifier(path):
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(str(a).endswith("ForImageClassification") for a in architectures)


def load_task_model(path: PathLike, label_names: Sequence[str] | None = None) -> TaskModel:
    """A fine-tuned classifier folder (text or image) as encoder + head, its labels checked against the data's."""
    if is_image_model(path):
        return vision.load_image_task_model(path, label_names)
    return hf.load_task_model(path, list(label_names) if label_names is not None else None)


def load_encoder(source: PathLike | Mapping[str, torch.Tensor], reference: PathLike, pooling: str | None) -> Any:
    """The encoder to evaluate (a checkpoint or a state dict) in the architecture of the fine-tuned ``reference``,
    reading the feature ``pooling`` its heads read."""
    if is_image_model(reference):
        return vision.load_image_encoder(source, reference, pooling or "cls")
    return hf.load_encoder(source, reference, pooling=pooling)
