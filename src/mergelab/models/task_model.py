"""An encoder (inputs → features) plus a task head (features → logits); heads are never merged."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mergelab.errors import DataError


@dataclass
class TaskModel:
    """Encoder + head + label names. ``encoder`` maps a batch to features [B, d]; ``head`` maps features to
    logits [B, C]. For text encoders the encoder also has ``encode_texts`` (see ``mergelab.models.hf``)."""

    encoder: nn.Module
    head: nn.Module
    label_names: list[str]

    @classmethod
    def from_modules(cls, encoder: nn.Module, head: nn.Module, label_names: list[str]) -> TaskModel:
        """Any torch encoder (batch tensor → [B, d]) with any head, e.g. ``nn.Linear(d, C)``."""
        out_features = getattr(head, "out_features", None)
        if out_features is not None and out_features != len(label_names):
            raise DataError(f"the head has {out_features} outputs but {len(label_names)} label names were given")
        return cls(encoder.eval(), head.eval(), list(label_names))


def check_label_names(head_names: list[str], data_names: list[str], where: str) -> None:
    """A head's labels and a dataset's labels must agree in count, and in order unless the head's are generic."""
    if len(head_names) != len(data_names):
        raise DataError(
            f"{where}: the head has {len(head_names)} classes {head_names[:10]} but the data has "
            f"{len(data_names)} {data_names[:10]}; use the fine-tuned model of this task"
        )
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(head_names))
    if not generic and [str(n) for n in head_names] != [str(n) for n in data_names]:
        raise DataError(
            f"{where}: the head's labels {head_names} differ from the data's labels {data_names}; a silent "
            "misalignment would make every accuracy wrong — fix id2label in the checkpoint's config or the data"
        )
