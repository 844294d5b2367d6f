"""Align tensor names across checkpoints saved in different layouts.

A pretrained base is often saved as a bare encoder (``BertModel``: ``embeddings.*``, ``encoder.*``) while the
fine-tuned task models carry the base-model prefix and a head (``BertForSequenceClassification``:
``bert.embeddings.*`` + ``classifier.*``). We rename each model's keys into the reference (base) layout by
stripping or adding the one prefix that makes the most names match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelab.io.formats import CheckpointReader, borrowed


@dataclass(frozen=True)
class KeyMapping:
    """How a model's keys map onto the reference layout: strip ``strip`` then prepend ``add``."""

    strip: str = ""
    add: str = ""

    def to_reference(self, key: str) -> str | None:
        if self.strip:
            if not key.startswith(self.strip + "."):
                return None
            key = key[len(self.strip) + 1 :]
        return f"{self.add}.{key}" if self.add else key

    def describe(self) -> str:
        if self.strip:
            return f"strip prefix '{self.strip}.'"
        if self.add:
            return f"add prefix '{self.add}.'"
        return "same layout"


def _first_components(keys: list[str]) -> set[str]:
    return {k.split(".", 1)[0] for k in keys if "." in k}


def find_key_mapping(reference_keys: list[str], model_keys: list[str]) -> KeyMapping:
    """The prefix strip/add that maps the most of ``model_keys`` onto ``reference_keys`` (identity on ties)."""
    reference = set(reference_keys)
    candidates = [KeyMapping()]
    candidates += [KeyMapping(strip=p) for p in sorted(_first_components(model_keys))]
    candidates += [KeyMapping(add=p) for p in sorted(_first_components(reference_keys))]

    def score(mapping: KeyMapping) -> int:
        return sum(1 for k in model_keys if mapping.to_reference(k) in reference)

    return max(candidates, key=score)  # max keeps the first (identity) among equal scores


@dataclass
class AlignedReader:
    """A reader whose keys are renamed into the reference layout (keys that do not map are dropped)."""

    inner: CheckpointReader
    mapping: KeyMapping
    _to_source: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self._to_source = {}
        for key in self.inner.keys():
            ref = self.mapping.to_reference(key)
            if ref is not None:
                self._to_source[ref] = key

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def config_dir(self) -> Path | None:
        return self.inner.config_dir

    def unmapped_keys(self) -> list[str]:
        """Keys of the underlying checkpoint outside the reference layout (e.g. a classification head)."""
        mapped = set(self._to_source.values())
        return [k for k in self.inner.keys() if k not in mapped]

    def keys(self) -> list[str]:
        return list(self._to_source)

    def __contains__(self, name: str) -> bool:
        return name in self._to_source

    def source_name(self, name: str) -> str:
        return self._to_source.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self.source_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self.source_name(name))

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self.source_name(name))

    def view(self, name: str) -> torch.Tensor:
        return borrowed(self.inner, self.source_name(name))


def align(reference: CheckpointReader, model: CheckpointReader) -> AlignedReader:
    """View ``model`` in ``reference``'s key layout."""
    return AlignedReader(model, find_key_mapping(reference.keys(), model.keys()))
