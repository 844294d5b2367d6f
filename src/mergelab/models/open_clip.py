"""open_clip checkpoints (the task-vector / Surgery / AdaMerging backbones): the vision tower as the encoder, each
task's head derived from the pretrained text tower.

An open_clip model folder holds ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, the
layout of open_clip's hub export) and its weights (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``,
...); open_clip's own ``local-dir:`` loading reads it, never a download. The feature is the L2-normalised image
embedding (``model.visual``, whose output is already projected); a head is exp(logit_scale) times the normalised,
template-averaged, normalised again class-name text embeddings, bias-free (algorithms.md, zero-shot heads).
Preprocessing is open_clip's own evaluation transform for the model.

open_clip (and torchvision, which it imports) is imported only when such a folder is loaded; when it does not
import, loading is a one-line ``ConfigError`` naming ``pip install open_clip_torch torchvision``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.models.hf import _read_weights
from mergelab.models.task_model import TaskModel
from mergelab.models.vision import DEFAULT_TEMPLATES, ImageEncoder, check_templates, zero_shot_head

OPEN_CLIP_CONFIG = "open_clip_config.json"
INSTALL = "pip install open_clip_torch torchvision"


def is_open_clip_folder(path: str | Path) -> bool:
    """Whether ``path`` is an open_clip model folder (it has ``open_clip_config.json``)."""
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


def require_open_clip() -> ModuleType:
    """The ``open_clip`` package; when it (or torchvision, which it imports) fails to import, one ConfigError line
    naming the install command."""
    try:
        return importlib.import_module("open_clip")
    except Exception as exc:  # ImportError, or torchvision failing inside open_clip's own import
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"open_clip checkpoints need the open_clip package, which does not import here "
                          f"({type(exc).__name__}: {reason}); install it with `{INSTALL}`") from None  # fmt: skip


def _require_folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not is_open_clip_folder(folder):
        raise CheckpointError(f"{what} {folder} is not an open_clip model folder (no {OPEN_CLIP_CONFIG})")
    return folder


def load_open_clip(folder: str | Path) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """The open_clip model of ``folder`` (float32, eval mode) and its evaluation transform (PIL image → tensor)."""
    open_clip = require_open_clip()
    folder = _require_folder(folder, "open_clip model")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.float().eval(), preprocess


class TransformProcessor:
    """open_clip's transform behind the image-processor call ``processor(images=..., return_tensors="pt")``."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, images: Sequence[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}


class OpenClipImageEncoder(nn.Module):
    """An open_clip vision tower: ``pixel_values`` → L2-normalised image embeddings [B, d]."""

    pooling = "open_clip"

    def __init__(self, visual: nn.Module, transform: Callable[[Any], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.processor = None if transform is None else TransformProcessor(transform)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixel_values), dim=-1)

    def encode_images(self, split: Any, batch_size: int = 64, progress: Callable[[int], None] | None = None,
                      precision: str = "fp32") -> torch.Tensor:  # fmt: skip
        """Features of every image of ``split`` (an ``ImageSplit``), one batch of pixels at a time."""
        return ImageEncoder.encode_images(self, split, batch_size, progress, precision)  # type: ignore[arg-type]


class OpenClipTextTower:
    """A pretrained open_clip model and its tokenizer: the text tower that builds zero-shot heads."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.model, self.tokenizer = model, tokenizer

    def class_weights(self, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """[C, d]: per class, every template's normalised text embedding, averaged, normalised again, times
        exp(logit_scale)."""
        if not class_names:
            raise ConfigError("a zero-shot head needs at least one class name")
        templates = check_templates(templates)
        rows = []
        with torch.no_grad():
            for name in class_names:
                text = self.model.encode_text(self.tokenizer([t.format(name) for t in templates]))
                rows.append(F.normalize(F.normalize(text, dim=-1).mean(dim=0), dim=-1))
            scale = self.model.logit_scale.exp()
        return torch.stack(rows).float() * scale.float()


def load_open_clip_text(folder: str | Path) -> OpenClipTextTower:
    """The text tower (model and tokenizer) of the open_clip folder ``folder``."""
    open_clip = require_open_clip()
    model, _ = load_open_clip(folder)
    return OpenClipTextTower(model, open_clip.get_tokenizer(f"local-dir:{Path(folder)}"))


def open_clip_task_model(path: str | Path, label_names: Sequence[str], weights: torch.Tensor) -> TaskModel:
    """A (fine-tuned) open_clip folder's vision tower as the encoder with the zero-shot head of ``weights``."""
    if len(weights) != len(label_names):
        raise ConfigError(f"the zero-shot head has {len(weights)} classes but the task has {len(label_names)}")
    model, transform = load_open_clip(path)
    return TaskModel(OpenClipImageEncoder(model.visual, transform), zero_shot_head(weights),
                     [str(n) for n in label_names])  # fmt: skip


def load_visual_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (a whole open_clip model's tensors, ``visual.*``, or the vision tower's own) into ``model``'s
    vision tower; a tensor of the tower missing from it is a CheckpointError."""
    prefix = "visual."
    visual = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or dict(state)
    missing, _ = model.visual.load_state_dict(visual, strict=False)
    if missing:
        raise CheckpointError(f"the encoder checkpoint lacks {len(missing)} tensors of the open_clip vision tower "
                              f"({sorted(missing)[:3]}); pass the whole vision tower")  # fmt: skip


def load_open_clip_encoder(source: str | Path | Mapping[str, torch.Tensor], reference: str | Path) -> OpenClipImageEncoder:
    """The vision tower of a merged open_clip model: an open_clip folder, or a state dict / folder of safetensors
    weights in the reference's layout (whole model or vision tower); preprocessing is the reference's."""
    model, transform = load_open_clip(reference)
    if not isinstance(source, Mapping) and is_open_clip_folder(source):
        merged, _ = load_open_clip(source)
        return OpenClipImageEncoder(merged.visual, transform).eval()
    load_visual_state(model, dict(source) if isinstance(source, Mapping) else _read_weights(Path(source)))
    return OpenClipImageEncoder(model.visual, transform).eval()
