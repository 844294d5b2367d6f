"""The contract of data-dependent merging methods, and the small helpers they share.

Unlike the streaming weight-space methods (``mergelab.merging``), these need activations of the fine-tuned models on
task inputs, so they work on whole (small) models in memory (``spec.runs == "in_memory"``). A method's spec declares
which split of each task it may read (``reads``: ``"train"`` for Fisher / RegMean, ``"test"`` for AdaMerging, which
is therefore transductive, ``"validation"`` with labels for the TALL-mask λ selection) and the method turns an
:class:`ExpertSet` into one merged encoder state dict in the base layout: every float tensor of the encoder is merged,
heads are never merged, integer buffers (e.g. ``position_ids``) come from the base.

``ExpertSet.device`` is where the methods run the models on their inputs (forward and backward passes, Grams,
Fishers, AdaMerging's coefficients); what they return is on the CPU (``assemble`` puts every tensor there), and the
closed-form combinations (Fisher average, RegMean solve, TALL masks) run on the CPU in float64 as before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import CPU
from mergelab.core.errors import CheckpointError, DataError
from mergelab.merging.ops import task_vectors
from mergelab.merging.spec import Method
from mergelab.models.hf import load_encoder
from mergelab.models.task_model import TaskModel

Split = Literal["train", "validation", "test"]
State = dict[str, torch.Tensor]


@dataclass
class ExpertInput:
    """One task: its fine-tuned model (encoder + head), checkpoint path, and the inputs the method may use."""

    task: str
    model: TaskModel
    path: Path
    texts: list[str]
    labels: list[int] | None = None  # only for methods that select on labelled validation data


@dataclass
class ExpertSet:
    """The pretrained base (an HF folder) and one :class:`ExpertInput` per task, plus tokenisation settings."""

    base_path: Path
    experts: list[ExpertInput]
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 32
    seed: int = 0
    memo: dict[Any, Any] | None = None  # caller-owned store for results that do not depend on every parameter
    device: torch.device = CPU  # where the models run on the inputs (results come back to the CPU)

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.experts]

    def base_encoder(self) -> Any:
        """A fresh float32 ``TextEncoder`` of the base with the experts' feature (their pooling); its ``.model`` is a
        scratch model methods may reload."""
        poolings = {getattr(e.model.encoder, "pooling", None) for e in self.experts}
        if len(poolings) > 1:
            raise DataError(f"the experts read different features ({sorted(map(str, poolings))}); merge experts of "
                            "one kind (all pooled classifiers, or all of the family's own classifiers)")  # fmt: skip
        return load_encoder(self.base_path, self.base_path, pooling=poolings.pop() if poolings else None)

    def expert_states(self) -> list[State]:
        """Each expert's encoder state dict in base layout (references to the live tensors: do not modify)."""
        return [{n: t.detach() for n, t in e.model.encoder.model.state_dict().items()} for e in self.experts]


class DataMergeMethod(Method, ABC):
    """A merging method that reads task data: its ``spec`` (``runs="in_memory"``, ``reads`` a split) declares it;
    ``merge`` does the work and fills ``info`` with what it learned or chose (coefficients, λ per task, ...)."""

    @abstractmethod
    def merge(self, experts: ExpertSet) -> State:
        """The merged encoder state dict (base layout, every key of the base encoder)."""


# ------------------------------------------------------------------------------------------------------ helpers


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of ``texts`` in order (``batch_size`` 1 gives unpadded single examples)."""
    return [
        dict(
            tokenizer(
                list(texts[i : i + batch_size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def float_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors (the ones that are merged)."""
    return [n for n, t in state.items() if t.is_floating_point()]


def check_layouts(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], tasks: Sequence[str]
) -> None:
    """Every float tensor of the base encoder exists with the same shape in every expert's encoder."""
    for task, state in zip(tasks, experts, strict=True):
        for name in float_names(base):
            if name not in state:
                raise CheckpointError(
                    f"the fine-tuned model of task '{task}' has no encoder tensor '{name}'; "
                    "use fine-tunes of this base model"
                )
            if tuple(state[name].shape) != tuple(base[name].shape):
                raise CheckpointError(
                    f"task '{task}': encoder tensor '{name}' has shape {tuple(state[name].shape)} but "
                    f"the base has {tuple(base[name].shape)}; use fine-tunes of this base model"
                )


def assemble(base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]) -> State:
    """The output state dict: every base key, merged float tensors (cast to the base dtype, on the base's device,
    i.e. the CPU) where given, else θ₀."""
    out = {}
    for name, reference in base.items():
        if name in merged and reference.is_floating_point():
            out[name] = merged[name].detach().to(device=reference.device, dtype=reference.dtype).contiguous()
        else:
            out[name] = reference.detach().clone()
    return out


def expert_task_vectors(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> list[State]:
    """Each expert's τ_t = θ_t − θ₀ (float32) for every name (``ops.task_vectors`` tensor by tensor)."""
    per_name = {n: task_vectors(base[n], [state[n] for state in experts]) for n in names}
    return [{n: per_name[n][t] for n in names} for t in range(len(experts))]
