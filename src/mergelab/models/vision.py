"""Image models split into encoder (what gets merged) and head (never merged): HF image classifiers and CLIP.

**Image classifiers** (``*ForImageClassification``: ViT, ConvNeXt, Swin, BEiT, …). The head is the classifier's
parameterised child other than its base model; the feature is the tensor that head receives in the model's own
forward. Rather than one rule per family, the split tries the features a base model can hand a head — ``pooler``
(``pooler_output``: ConvNeXt, Swin), ``cls`` (the first token of ``last_hidden_state``: ViT, DeiT) and ``mean`` (the
token mean) — and keeps the first whose ``head(feature)`` reproduces the model's own logits on a random probe batch;
a model no rule fits is refused with a message naming ``TaskModel.from_modules``.

**CLIP** (HF ``CLIPModel`` folders). The merged part is the vision tower with its projection; the feature is the
L2-normalised image embedding. Each task's head is built from the *pretrained* text tower: every class name through
every prompt template, the text embeddings normalised, averaged over templates, normalised again and multiplied by
the logit scale (FusionBench's and the FT-Classifier appendix's zero-shot head), a bias-free ``nn.Linear``.

Preprocessing is the model's own image processor (``AutoImageProcessor``), never hand-written resizing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.models.hf import _read_weights, _require_folder, head_label_names
from mergelab.models.task_model import TaskModel, check_label_names

IMAGE_FEATURES = ("pooler", "cls", "mean")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
PROBE_SEED = 0


def image_feature(output: Any, pooling: str) -> torch.Tensor:
    """The feature ``pooling`` of a base image model's output: ``pooler``, ``cls`` or ``mean`` (of the tokens)."""
    if pooling == "pooler":
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise CheckpointError("the base model returns no pooler_output; it has no pooler for a 'pooler' feature")
        return pooled.flatten(1)
    hidden = output.last_hidden_state
    if hidden.ndim != 3:
        raise CheckpointError(f"a '{pooling}' feature needs token states [B, T, d], got {tuple(hidden.shape)}")
    return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)


class ImageEncoder(nn.Module):
    """A base image model and the feature its head reads: ``pixel_values`` [B, C, H, W] → features [B, d]."""

    def __init__(self, model: nn.Module, pooling: str, processor: Any = None) -> None:
        super().__init__()
        if pooling not in IMAGE_FEATURES:
            raise ConfigError(f"unknown image feature '{pooling}'; choose one of: {', '.join(IMAGE_FEATURES)}")
        self.model, self.pooling, self.processor = model, pooling, processor

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_feature(self.model(pixel_values=pixel_values), self.pooling)

    def encode_images(self, split: Any, batch_size: int = 64, progress: Callable[[int], None] | None = None,
                      precision: str = "fp32") -> torch.Tensor:  # fmt: skip
        """Features of every image of ``split`` (an ``ImageSplit``), one batch of pixels at a time."""
        if self.processor is None:
            raise ConfigError("this image encoder has no image processor; load it from a folder that has one")
        if precision != "fp32":
            raise ConfigError(f"image features run in fp32 here; precision {precision!r} is for text encoders")
        return torch.cat([encode_images(self, self.processor, split.images(start, start + batch_size),
                                        batch_size, progress) for start in range(0, len(split), batch_size)])  # fmt: skip


class ClipImageEncoder(nn.Module):
    """CLIP's vision tower and projection: ``pixel_values`` → L2-normalised image embeddings [B, d_proj]."""

    pooling = "clip"

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, processor: Any = None) -> None:
        super().__init__()
        self.vision_model, self.visual_projection, self.processor = vision_model, visual_projection, processor

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def encode_images(self, split: Any, batch_size: int = 64, progress: Callable[[int], None] | None = None,
                      precision: str = "fp32") -> torch.Tensor:  # fmt: skip
        """Features of every image of ``split`` (an ``ImageSplit``), one batch of pixels at a time."""
        return ImageEncoder.encode_images(self, split, batch_size, progress, precision)  # type: ignore[arg-type]


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The (name, module) of an image classifier's head: its one parameterised child besides the base model."""
    prefix = model.base_model_prefix
    children = [(n, m) for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]
    if len(children) != 1:
        raise CheckpointError(
            f"cannot find the head of a '{model.config.model_type}' image classifier (candidates: "
            f"{[n for n, _ in children]}); wrap it with TaskModel.from_modules(encoder, head, label_names)"
        )
    return children[0]


def probe_pixels(config: Any, batch: int = 3) -> torch.Tensor:
    """A seeded random batch of images of the size the config expects (for checking a split)."""
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=generator)


def split_image_classifier(model: nn.Module, processor: Any = None) -> tuple[ImageEncoder, nn.Module]:
    """The encoder (base model + the feature its head reads) and the head of an HF image classifier, checked on a
    probe batch: ``head(encoder(x))`` equals the model's own logits."""
    name, head = classifier_head(model)
    base = getattr(model, model.base_model_prefix)
    pixels = probe_pixels(model.config)
    problems = []
    with torch.no_grad():
        model.eval()
        own = model(pixel_values=pixels).logits
        for pooling in IMAGE_FEATURES:
            encoder = ImageEncoder(base, pooling, processor).eval()
            try:
                logits = head(encoder(pixels))
            except (CheckpointError, RuntimeError) as exc:
                problems.append(f"{pooling}: {exc}")
                continue
            if logits.shape == own.shape and torch.allclose(logits, own, atol=1e-5, rtol=1e-4):
                return encoder, head
            problems.append(f"{pooling}: logits differ")
    raise CheckpointError(
        f"cannot split a '{model.config.model_type}' image classifier at its head '{name}' ({'; '.join(problems)}); "
        "wrap it with TaskModel.from_modules(encoder, head, label_names)"
    )


def encode_images(encoder: nn.Module, processor: Any, images: Sequence[Any], batch_size: int = 64,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:  # fmt: skip
    """float32 CPU features [N, d] of ``images`` (PIL images), preprocessed by the model's own processor in
    batches (memory bounded by one batch), eval mode, no gradients."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    encoder.eval()
    device = next(encoder.parameters()).device
    outs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"]
            outs.append(encoder(pixels.to(device)).float().cpu())  # deliberate: features live on the CPU
            if progress is not None:
                progress(len(chunk))
    return torch.cat(outs) if outs else torch.empty(0, 0)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The prompt templates as a tuple; none, or one without ``{}`` for the class name, is a one-line ConfigError."""
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"every prompt template must contain '{{}}' for the class name; got {list(templates)}")
    return tuple(templates)


def zero_shot_weights(clip: nn.Module, tokenizer: Any, class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:  # fmt: skip
    """[C, d_proj]: per class, the normalised text embeddings of every template, averaged, normalised again, times
    the logit scale (exp of CLIP's learned temperature)."""
    if not class_names:
        raise ConfigError("a zero-shot head needs at least one class name")
    check_templates(templates)
    rows = []
    with torch.no_grad():
        for name in class_names:
            batch = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            text = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            text = getattr(text, "pooler_output", text)  # transformers returns a tensor or an output with it
            rows.append(F.normalize(F.normalize(text, dim=-1).mean(dim=0), dim=-1))
        scale = clip.logit_scale.exp()
    return torch.stack(rows) * scale


def zero_shot_head(weights: torch.Tensor) -> nn.Linear:
    """A bias-free Linear head with the zero-shot ``weights`` [C, d] (logits = scale · cos(image, class))."""
    head = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(weights)
    return head.eval()


def clip_image_encoder(clip: nn.Module, processor: Any = None) -> ClipImageEncoder:
    """The merged part of a CLIP model: its vision tower and visual projection."""
    return ClipImageEncoder(clip.vision_model, clip.visual_projection, processor).eval()


def is_image_classifier(config: Any) -> bool:
    """Whether an HF config describes an image classifier (``*ForImageClassification``)."""
    return any(str(a).endswith("ForImageClassification") for a in (getattr(config, "architectures", None) or []))


def load_processor(folder: Path) -> Any:
    """The model's own image processor (the slow, PIL/numpy one: no torchvision needed)."""
    from transformers import AutoImageProcessor  # lazy: transformers' auto classes cost ~1 s to import

    try:
        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, use_fast=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} has no image processor ({exc}); save the model's processor with it "
                              "(processor.save_pretrained(folder))") from None  # fmt: skip


def load_image_task_model(path: str | Path, label_names: Sequence[str] | None = None) -> TaskModel:
    """A fine-tuned HF image classifier folder as encoder (base model + its head's feature) + head."""
    from transformers import AutoConfig, AutoModelForImageClassification  # lazy: see load_processor

    folder = _require_folder(path, "fine-tuned image classifier")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    head_names = head_label_names(config)
    if label_names is not None:
        check_label_names(head_names, list(label_names), f"fine-tuned model {folder}")
    model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True).float().eval()
    encoder, head = split_image_classifier(model, load_processor(folder))
    names = [str(n) for n in label_names] if label_names is not None else head_names
    return TaskModel(encoder, head.eval(), names)


def load_image_encoder(source: str | Path | Mapping[str, torch.Tensor], reference: str | Path,
                       pooling: str) -> ImageEncoder:  # fmt: skip
    """The base model of the image classifier ``reference`` with the weights of ``source`` (a model folder: a
    classifier or a bare base; a folder of weights; or a state dict in the checkpoint's layout) and the feature
    ``pooling``. transformers' own loading maps the checkpoint's tensor names; the processor is the reference's."""
    from transformers import AutoModelForImageClassification  # lazy: see load_processor

    reference = _require_folder(reference, "reference image classifier")
    if isinstance(source, Mapping):
        where, state = reference, dict(source)
    else:
        folder = _require_folder(source, "encoder checkpoint")
        where, state = (folder, None) if (folder / "config.json").is_file() else (reference, _read_weights(folder))
    model, info = AutoModelForImageClassification.from_pretrained(
        str(where), local_files_only=True, output_loading_info=True, **({"state_dict": state} if state else {}))
    head_name, _ = classifier_head(model)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(f"{head_name}.")]
    if missing:
        raise CheckpointError(f"the encoder checkpoint lacks {len(missing)} tensors of the base model "
                              f"({sorted(missing)[:3]}); pass the whole encoder")  # fmt: skip
    return ImageEncoder(model.base_model.float().eval(), pooling, load_processor(reference))


def load_clip(folder: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """An HF ``CLIPModel`` from ``folder`` (with the weights of ``state`` when given), float32, eval mode."""
    from transformers import CLIPModel  # lazy: see load_processor

    folder = _require_folder(folder, "CLIP model")
    kwargs = {"state_dict": dict(state)} if state is not None else {}
    return CLIPModel.from_pretrained(str(folder), local_files_only=True, **kwargs).float().eval()


class ClipTextTower:
    """A pretrained HF CLIP and its tokenizer: the text tower that builds zero-shot heads."""

    def __init__(self, clip: nn.Module, tokenizer: Any) -> None:
        self.clip, self.tokenizer = clip, tokenizer

    def class_weights(self, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """[C, d_proj] zero-shot weights of ``class_names`` (``zero_shot_weights``)."""
        return zero_shot_weights(self.clip, self.tokenizer, [str(n) for n in class_names], templates)


def load_clip_text(folder: str | Path, clip: nn.Module | None = None) -> ClipTextTower:
    """The text tower of the CLIP folder ``folder`` (its model, or the already loaded ``clip``, and its tokenizer)."""
    from transformers import AutoTokenizer  # lazy: see load_processor

    folder = _require_folder(folder, "CLIP text tower")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ClipTextTower(clip if clip is not None else load_clip(folder), tokenizer)


def clip_task_model(path: str | Path, label_names: Sequence[str], weights: torch.Tensor) -> TaskModel:
    """A (fine-tuned) CLIP folder's vision tower as the encoder with the zero-shot head of ``weights`` [C, d]."""
    folder = _require_folder(path, "CLIP model")
    if len(weights) != len(label_names):
        raise ConfigError(f"the zero-shot head has {len(weights)} classes but the task has {len(label_names)}")
    return TaskModel(clip_image_encoder(load_clip(folder), load_processor(folder)), zero_shot_head(weights),
                     [str(n) for n in label_names])  # fmt: skip


def load_clip_task_model(path: str | Path, label_names: Sequence[str], text_source: str | Path | None = None,
                         templates: Sequence[str] = DEFAULT_TEMPLATES) -> TaskModel:  # fmt: skip
    """A (fine-tuned) CLIP folder as a task model: its vision tower as the encoder, the zero-shot head of the class
    names built from the text tower of ``text_source`` (the pretrained CLIP; default: ``path`` itself). Built
    every call: ``mergelab.evaluation.zero_shot`` caches heads by content."""
    clip = load_clip(path)
    text = load_clip_text(text_source or path, None if text_source is not None else clip)
    head = zero_shot_head(text.class_weights(label_names, templates))
    return TaskModel(clip_image_encoder(clip, load_processor(_require_folder(path, "CLIP model"))), head,
                     [str(n) for n in label_names])  # fmt: skip


def load_clip_encoder(source: str | Path | Mapping[str, torch.Tensor], reference: str | Path) -> ClipImageEncoder:
    """The vision tower (+ projection) of a merged CLIP: a CLIP folder, or a state dict / weights folder in the
    reference's layout."""
    if isinstance(source, Mapping):
        clip = load_clip(reference, source)
    else:
        folder = _require_folder(source, "encoder checkpoint")
        clip = load_clip(folder) if (folder / "config.json").is_file() else load_clip(reference, _read_weights(folder))
    return clip_image_encoder(clip, load_processor(_require_folder(reference, "reference CLIP")))
