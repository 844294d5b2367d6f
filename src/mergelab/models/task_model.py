"""A task model: an encoder (inputs → features [B, d]) plus a task head (features → logits); heads are never merged.

Each task keeps its own head; merging touches only the encoder. Hugging Face classifiers are split into the two
parts by :func:`mergelab.models.hf.load_task_model`; any other architecture comes in through
:meth:`TaskModel.from_modules`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.core.device import module_device
from mergelab.core.errors import ConfigError, DataError

_GENERIC = re.compile(r"LABEL_(\d+)")


@dataclass
class TaskModel:
    """Encoder + head + label names (``head(encoder(x))`` are the task's logits, class ``i`` is ``label_names[i]``).

    ``encoder`` maps a batch to features [B, d]; text encoders (``mergelab.models.hf.TextEncoder``) take the
    tokenizer's keyword tensors and also offer ``encode_texts``, user encoders take one batch tensor.
    """

    encoder: nn.Module
    head: nn.Module
    label_names: list[str]

    @classmethod
    def from_modules(cls, encoder: nn.Module, head: nn.Module, label_names: Sequence[str]) -> TaskModel:
        """Any torch encoder (batch tensor → [B, d]) with its head, e.g. ``nn.Linear(d, C)``; both set to eval."""
        for role, module in (("encoder", encoder), ("head", head)):
            if not isinstance(module, nn.Module):
                raise ConfigError(f"the {role} must be a torch.nn.Module, got {type(module).__name__}")
        names = [str(n) for n in label_names]
        if not names:
            raise DataError("a task model needs at least one label name")
        outputs = head_output_count(head)
        if outputs is not None and outputs != len(names):
            raise DataError(
                f"the head has {outputs} outputs but {len(names)} label names were given ({names[:10]}); "
                "give one name per output class"
            )
        return cls(encoder.eval(), head.eval(), names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """``head(encoder(inputs))`` in eval mode without gradients, for a user encoder taking a batch tensor
        (``inputs`` are moved to the encoder's device; the logits stay there)."""
        self.encoder.eval()
        self.head.eval()
        return self.head(self.encoder(inputs.to(module_device(self.encoder))))


def head_output_count(head: nn.Module) -> int | None:
    """The number of classes a head produces: ``out_features`` of its last ``nn.Linear`` (None if it has none)."""
    if isinstance(head, nn.Linear):
        return head.out_features
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def is_generic_name(name: str, index: int) -> bool:
    """Placeholder names that carry no meaning: ``LABEL_i`` (the HF default) or the bare index ``"i"``."""
    match = _GENERIC.fullmatch(str(name))
    return (match is not None and int(match.group(1)) == index) or str(name) == str(index)


def check_label_names(head_names: Sequence[str], data_names: Sequence[str], where: str) -> None:
    """A head's classes and a dataset's classes must agree in count, and name by name where neither is generic.

    Raises DataError naming both lists: a silent misalignment would make every accuracy wrong.
    """
    head_list, data_list = [str(n) for n in head_names], [str(n) for n in data_names]
    if len(head_list) != len(data_list):
        raise DataError(
            f"{where}: the head has {len(head_list)} classes {head_list} but the data has {len(data_list)} "
            f"classes {data_list}; use the fine-tuned model of this task (or fix the data's label names)"
        )
    clashes = [
        i for i, (h, d) in enumerate(zip(head_list, data_list, strict=True))
        if h.strip() != d.strip() and not is_generic_name(h, i) and not is_generic_name(d, i)
    ]  # fmt: skip
    if clashes:
        raise DataError(
            f"{where}: the head's labels {head_list} differ from the data's labels {data_list} (first at class "
            f"{clashes[0]}: '{head_list[clashes[0]]}' vs '{data_list[clashes[0]]}'); fix id2label in the "
            "checkpoint's config.json or the order of the data's label names"
        )
