"""The contract of data-dependent merging methods, and the small helpers they share.

Unlike the streaming weight-space methods (``mergelab.merging``), these need activations of the fine-tuned models on
task inputs, so they work on whole (small) models in memory. A method declares which split of each task it may read
(``split``: ``"train"`` for Fisher / RegMean, ``"test"`` for AdaMerging, which is therefore ``transductive``,
``"validation"`` with labels for the TALL-mask λ selection) and turns an :class:`ExpertSet` into one merged encoder
state dict in the base layout: every float tensor of the encoder is merged, heads are never merged, integer buffers
(e.g. ``position_ids``) come from the base.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.merging.base import MethodParams
from mergelab.merging.ops import elect_signs, kth_smallest_magnitude, majority_sign, trim, trim_rank
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
    max_length: int = 64
    batch_size: int = 32
    seed: int = 0
    memo: dict[Any, Any] | None = None  # caller-owned store for results that do not depend on every parameter

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.experts]

    def base_encoder(self) -> Any:
        """A fresh float32 ``TextEncoder`` of the base with the experts' feature (their pooling); its ``.model`` is a
        scratch model methods may reload."""
        from mergelab.models.hf import load_encoder

        poolings = {getattr(e.model.encoder, "pooling", None) for e in self.experts}
        if len(poolings) > 1:
            raise DataError(f"the experts read different features ({sorted(map(str, poolings))}); merge experts of "
                            "one kind (all pooled classifiers, or all of the family's own classifiers)")  # fmt: skip
        return load_encoder(self.base_path, self.base_path, pooling=poolings.pop() if poolings else None)

    def expert_states(self) -> list[State]:
        """Each expert's encoder state dict in base layout (references to the live tensors: do not modify)."""
        return [{n: t.detach() for n, t in e.model.encoder.model.state_dict().items()} for e in self.experts]


class DataMergeMethod(ABC):
    """A merging method that reads task data: ``Params`` declares its parameters; ``merge`` does the work.

    ``info`` is filled by ``merge`` with what the method learned or chose (e.g. coefficients, λ per task), for logs.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    split: ClassVar[Split] = "train"
    needs_labels: ClassVar[bool] = False
    transductive: ClassVar[bool] = False
    min_models: ClassVar[int] = 1

    def __init__(self, params: MethodParams) -> None:
        self.params = params
        self.info: dict[str, Any] = {}

    def check_count(self, num_models: int) -> None:
        if num_models < self.min_models:
            raise ConfigError(
                f"method '{self.name}' needs at least {self.min_models} fine-tuned models, got {num_models}"
            )

    @abstractmethod
    def merge(self, experts: ExpertSet) -> State:
        """The merged encoder state dict (base layout, every key of the base encoder)."""


# ------------------------------------------------------------------------------------------------------ helpers


def sample_indices(total: int, n: int | None, seed: int) -> list[int]:
    """Sorted indices of a seeded uniform subset of size min(n, total) of ``range(total)`` (all when n is None)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(np.random.default_rng(seed).choice(total, size=n, replace=False).tolist())


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
    """The output state dict: every base key, merged float tensors (cast to the base dtype) where given, else θ₀."""
    out = {}
    for name, reference in base.items():
        if name in merged and reference.is_floating_point():
            out[name] = merged[name].detach().to(reference.dtype).contiguous()
        else:
            out[name] = reference.detach().clone()
    return out


def task_vectors(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> list[State]:
    """τ_t = θ_t − θ₀ (float32) for every name."""
    return [{n: state[n].float() - base[n].float() for n in names} for state in experts]


class _Stacked(Sequence[torch.Tensor]):
    """``[T, numel]`` stacks of one tensor name at a time, built on access (no T×P copy held at once)."""

    def __init__(self, taus: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
        self.taus, self.names = taus, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < len(self.names):
            raise IndexError(index)
        return torch.stack([t[self.names[index]].float().reshape(-1) for t in self.taus])


def ties_selected_vectors(taus: Sequence[Mapping[str, torch.Tensor]], density: float = 0.2) -> list[State]:
    """TIES ``selected_entries``: trim each τ_t to its global top-``density`` magnitudes (over all its tensors, as
    TIES), elect γ = sign(Σ_t τ̂_t) with zero signs set to the global majority, keep the entries agreeing with γ.

    Σ_t of the result is the TIES dis-sum multi-task vector; AdaMerging++ learns coefficients on the result.
    """
    names = list(taus[0])
    stacks = _Stacked(taus, names)
    k = trim_rank(sum(taus[0][n].numel() for n in names), density)
    thresholds = kth_smallest_magnitude(stacks, k) if k >= 1 else torch.zeros(len(taus))
    majority = majority_sign(sum(int(elect_signs(trim(chunk, thresholds)).to(torch.int64).sum()) for chunk in stacks))
    out: list[State] = [{} for _ in taus]
    for name, chunk in zip(names, stacks, strict=True):
        trimmed = trim(chunk, thresholds)
        sign = elect_signs(trimmed)
        sign = torch.where(sign == 0, torch.tensor(majority), sign)
        agree = ((trimmed > 0) & (sign > 0)) | ((trimmed < 0) & (sign < 0))
        kept = torch.where(agree, trimmed, torch.zeros(()))
        for t, tau in enumerate(taus):
            out[t][name] = kept[t].reshape(tau[name].shape).clone()
    return out


def ties_multitask_vector(taus: Sequence[Mapping[str, torch.Tensor]], density: float = 0.2) -> State:
    """The TIES dis-sum multi-task vector Σ_t selected_t (K = 20 ⇔ ``density`` 0.2)."""
    selected = ties_selected_vectors(taus, density)
    return {n: torch.stack([s[n] for s in selected]).sum(0) for n in taus[0]}
