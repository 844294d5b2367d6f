"""One door for loading task models and encoders, text or image: dispatches on the fine-tuned model's config.

Text classifiers (and mergelab's pooled classifiers) go to :mod:`mergelab.models.hf`, HF image classifiers and CLIP
to :mod:`mergelab.models.vision`, EfficientNet-Lite folders to :mod:`mergelab.models.efficientnet`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.core.errors import ConfigError
from mergelab.models import efficientnet, hf, vision
from mergelab.models.task_model import TaskModel

PathLike = str | os.PathLike[str]


def model_type(path: PathLike) -> str | None:
    """The ``model_type`` of a model folder's config.json (None without one)."""
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def is_image_model(path: PathLike) -> bool:
    """Whether the model folder ``path`` holds an HF image classifier (read from its config.json only)."""
    config = Path(path) / "config.json"
    if not config.is_file() or hf.is_pooled_classifier(path):
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(str(a).endswith("ForImageClassification") for a in architectures)


def load_task_model(path: PathLike, label_names: Sequence[str] | None = None, *, text_source: PathLike | None = None,
                    templates: Sequence[str] = vision.DEFAULT_TEMPLATES) -> TaskModel:  # fmt: skip
    """A fine-tuned classifier folder (text or image) as encoder + head, its labels checked against the data's; a CLIP
    folder gets the zero-shot head of the data's class names (text tower of ``text_source``, default its own)."""
    if efficientnet.is_efficientnet_folder(path):
        return efficientnet.load_efficientnet_task_model(path, label_names)
    if model_type(path) == "clip":
        if label_names is None:
            raise ConfigError("a CLIP model's head is built from the task's class names; give the task's data")
        return vision.load_clip_task_model(path, label_names, text_source, templates)
    if is_image_model(path):
        return vision.load_image_task_model(path, label_names)
    return hf.load_task_model(path, list(label_names) if label_names is not None else None)


def load_encoder(source: PathLike | Mapping[str, torch.Tensor], reference: PathLike, pooling: str | None) -> Any:
    """The encoder to evaluate (a checkpoint or a state dict) in the architecture of the fine-tuned ``reference``,
    reading the feature ``pooling`` its heads read."""
    if efficientnet.is_efficientnet_folder(reference):
        return efficientnet.load_efficientnet_encoder(source, reference)
    if model_type(reference) == "clip":
        return vision.load_clip_encoder(source, reference)
    if is_image_model(reference):
        return vision.load_image_encoder(source, reference, pooling or "cls")
    return hf.load_encoder(source, reference, pooling=pooling)
