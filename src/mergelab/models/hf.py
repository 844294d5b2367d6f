"""Hugging Face sequence classifiers split into encoder + head exactly where the model's own forward splits.

| model_type | feature fed to the head | head |
|---|---|---|
| bert (incl. MiniLM) | ``pooler_output`` (the pooler is encoder weights, merged) | ``classifier`` (Linear) |
| roberta, xlm-roberta | ``last_hidden_state[:, 0]`` | ``RobertaClassificationHead`` (dense, tanh, out_proj) |
| distilbert | ``last_hidden_state[:, 0]`` | ``pre_classifier`` → ReLU → ``classifier`` |

Dropout is inactive: every module is used in eval mode, so features → head reproduces the model's own logits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.errors import CheckpointError, DataError
from mergelab.models.task_model import TaskModel, check_label_names

POOLING = {"bert": "pooler", "roberta": "cls", "xlm-roberta": "cls", "distilbert": "cls"}


def _pooling(model_type: str) -> str:
    if model_type not in POOLING:
        raise CheckpointError(
            f"model type '{model_type}' is not supported yet (supported: {', '.join(POOLING)}); wrap your model "
            "with TaskModel.from_modules(encoder, head, label_names)"
        )
    return POOLING[model_type]


class _RobertaHead(nn.Module):
    """RoBERTa's classification head takes the sequence; we feed it the <s> feature as a length-1 sequence."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.unsqueeze(1))


class TextEncoder(nn.Module):
    """A base model (``AutoModel``) + tokenizer, returning the feature the task head consumes."""

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        out = self.model(**batch)
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise CheckpointError("this encoder has no pooler but its head needs pooler_output")
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    @torch.no_grad()  # not inference_mode: protocols train on these features afterwards
    def encode_texts(self, texts: list[str], max_length: int = 128, batch_size: int = 64,
                     progress: Any = None) -> torch.Tensor:  # fmt: skip
        """Features of ``texts`` in order; batches are formed by length to pad little, results unsorted back."""
        self.eval()
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer.pad({k: [encoded[k][i] for i in idx] for k in encoded}, return_tensors="pt")
            features = self(**batch).float()
            if out is None:
                out = torch.empty(len(texts), features.shape[1])
            out[torch.tensor(idx)] = features
            if progress is not None:
                progress(len(idx))
        return out if out is not None else torch.empty(0, 0)


def _head_of(model: nn.Module, model_type: str) -> nn.Module:
    if model_type == "bert":
        return model.classifier
    if model_type in ("roberta", "xlm-roberta"):
        return _RobertaHead(model.classifier)
    if model_type == "distilbert":
        return nn.Sequential(model.pre_classifier, nn.ReLU(), model.classifier)
    _pooling(model_type)
    raise AssertionError("unreachable")


def load_task_model(path: str | os.PathLike[str], label_names: list[str] | None = None) -> TaskModel:
    """A fine-tuned ``AutoModelForSequenceClassification`` folder as encoder + head (+ label check)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    model_type = model.config.model_type
    pooling = _pooling(model_type)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = getattr(model, model.base_model_prefix)
    id2label = model.config.id2label
    head_names = [str(id2label[i]) for i in range(len(id2label))]
    if label_names is not None:
        check_label_names(head_names, list(label_names), f"fine-tuned model {path}")
    return TaskModel(TextEncoder(base, tokenizer, pooling), _head_of(model, model_type).eval(),
                     list(label_names) if label_names is not None else head_names)  # fmt: skip


def load_encoder(source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                 config_source: str | os.PathLike[str]) -> TextEncoder:  # fmt: skip
    """The base encoder from a folder (any layout) or an in-memory state dict in base layout (prefix optional).

    ``config_source`` is a folder with the config and tokenizer (e.g. the base model or a fine-tuned model).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from mergelab.io.alignment import find_key_mapping

    config = AutoConfig.from_pretrained(config_source)
    pooling = _pooling(config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(config_source)
    if isinstance(source, Mapping):
        model = AutoModel.from_config(config)
        expected = model.state_dict()
        mapping = find_key_mapping(list(expected), list(source))
        state = {}
        for key, value in source.items():
            ref = mapping.to_reference(key)
            if ref is not None and ref in expected:
                state[ref] = value.to(expected[ref].dtype)
        missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
        if missing:
            raise CheckpointError(f"the state dict lacks encoder tensors {missing[:5]} (key mapping: {mapping.describe()})")
        model.load_state_dict(state, strict=False)
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"encoder checkpoint {path} does not exist")
        model = AutoModel.from_pretrained(path)
    return TextEncoder(model.float().eval(), tokenizer, pooling)


def label_names_of(path: str | os.PathLike[str]) -> list[str]:
    """The id2label names of a classifier checkpoint's config."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    id2label = config.get("id2label") or {}
    if not id2label:
        raise DataError(f"{path}/config.json has no id2label")
    return [str(id2label[str(i)]) for i in range(len(id2label))]
