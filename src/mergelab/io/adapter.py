"""LoRA adapters (PEFT folders) as checkpoints: the adapted model, one tensor at a time, in the base's layout.

A PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) stores, per adapted module, two small
factors A (r × in) and B (out × r). The adapted weight is ``W = W_base + s · B·A`` with ``s = α / r`` (``α / √r``
with rsLoRA), transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D) and always for embeddings;
``rank_pattern`` / ``alpha_pattern`` override r and α per module. Full tensors saved in the adapter
(``modules_to_save``, trained biases) replace the base's. :class:`AdapterReader` presents that adapted model under the
base's tensor names, shapes and dtypes and computes a tensor only when ``get(name)`` asks for it, reading the base's
tensor and that module's A and B, so the streaming engine and every weight-space method take an adapter wherever they
take a fine-tuned model, without the whole model ever being in memory.

Only plain LoRA is supported; DoRA, the other LoRA variants and other adapter types (IA3, LoHa, LoKr, prompt
tuning, ...) are refused with a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.core.errors import CheckpointError
from mergelab.io.alignment import find_key_mapping
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.formats import (
    CheckpointReader,
    SafetensorsReader,
    StateDictReader,
    load_torch_weights,
    open_weights,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_TORCH = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PEFT's keys: base_model.model.<module path>.lora_A.weight
_WRAPPER_PARTS = ("base_layer", "modules_to_save")  # PEFT wrappers around a saved full tensor's module
_FIX = "merge it with PEFT's merge_and_unload() and pass the saved full model instead"
# LoraConfig fields that turn on a LoRA variant whose merged weight is not W + s·B·A (or that changes the model)
_VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}  # fmt: skip
_FACTOR = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)"
)


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraUpdate:
    """``W += scaling · (B·A)`` (transposed when ``transpose``) for one base tensor; or, with ``bias``, ``b += scaling · B.bias``."""

    module: str  # the module's path as the adapter names it (for messages)
    a_key: str
    b_key: str
    scaling: float
    transpose: bool = False
    bias: bool = False


class AdapterReader:
    """A LoRA adapter applied to its base: the adapted model's tensors under the base's names, computed per ``get``.

    ``keys()`` are the base's keys (same shapes and dtypes), followed by any full tensor the adapter saved that the
    base lacks (e.g. a classifier head trained with ``modules_to_save`` on a bare-encoder base), under its own name.
    """

    def __init__(self, folder: str | os.PathLike[str], base: CheckpointReader,
                 config: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.path = str(self.folder)
        self.base = base
        self.config = dict(config) if config is not None else read_adapter_config(self.folder)
        check_supported(self.config, self.folder)
        self.adapter = open_adapter_weights(self.folder)
        self._updates: dict[str, list[LoraUpdate]] = {}  # base name -> updates added to it
        self._replaced: dict[str, str] = {}  # base name -> adapter key of the full tensor replacing it
        self._extra: dict[str, str] = {}  # name outside the base -> adapter key
        self._plan()

    # --- the reader interface ---

    @property
    def config_dir(self) -> Path | None:
        return self.base.config_dir

    def keys(self) -> list[str]:
        return [*self.base.keys(), *self._extra]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._extra:
            return self.adapter.shape(self._extra[name])
        return self._base_meta(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        if name in self._extra:
            return self.adapter.dtype(self._extra[name])
        return self._base_meta(name)[1]

    def get(self, name: str) -> torch.Tensor:
        """The adapted tensor: reads the base's tensor (or the adapter's replacement) and this tensor's factors only.

        The caller owns the result (merge methods work in place): it never aliases a tensor the base or the adapter
        holds in memory."""
        if name in self._extra:
            return self.adapter.get(self._extra[name])
        _, dtype = self._base_meta(name)
        replaced = self._replaced.get(name)
        updates = self._updates.get(name)
        if not updates:
            tensor = self.adapter.get(replaced) if replaced is not None else self.base.get(name)
            return tensor.to(dtype)
        tensor = self.adapter.get(replaced) if replaced is not None else self.base.get(name)
        return (tensor.to(torch.float32) + sum(self._delta(u) for u in updates)).to(dtype)

    # --- introspection ---

    def adapted_names(self) -> list[str]:
        """Base tensors that a LoRA update changes."""
        return list(self._updates)

    def replaced_names(self) -> list[str]:
        """Base tensors that a full tensor saved in the adapter replaces (``modules_to_save``, trained biases)."""
        return list(self._replaced)

    def extra_names(self) -> list[str]:
        return list(self._extra)

    # --- internals ---

    def _base_meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        try:
            return self.base.shape(name), self.base.dtype(name)
        except CheckpointError:
            raise CheckpointError(
                f"tensor '{name}' is not in LoRA adapter {self.path} (nor in its base {self.base.path})"
            ) from None

    def _delta(self, update: LoraUpdate) -> torch.Tensor:
        b = self.adapter.get(update.b_key).to(torch.float32)
        if update.bias:
            return b * update.scaling
        a = self.adapter.get(update.a_key).to(torch.float32)
        delta = b @ a
        if update.transpose:
            delta = delta.T
        return delta * update.scaling

    def _plan(self) -> None:
        """Sort the adapter's tensors into LoRA factors and full tensors, map them onto the base's names and check
        every shape against the base (headers only: no tensor is read here)."""
        factors: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for key in self.adapter.keys():
            name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            match = _FACTOR.fullmatch(name)
            if match:
                factors.setdefault(match["module"], {})[match["part"]] = key
                continue
            if any(
                part.startswith("lora_") or part in ("trainable_tokens_delta", "token_adapter")
                for part in name.split(".")
            ):
                raise CheckpointError(
                    f"LoRA adapter {self.path} holds tensor '{key}', which is not a plain LoRA factor (lora_A/lora_B) "
                    f"or a saved full tensor; only plain LoRA is supported — {_FIX}"
                )
            full[".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)] = key

        updates: list[tuple[str, LoraUpdate, tuple[int, ...]]] = []  # (adapter-side tensor name, update, shape)
        for module, parts in factors.items():
            updates += self._module_updates(module, parts)

        mapping = find_key_mapping(self.base.keys(), [n for n, _, _ in updates] + list(full))
        base_keys = set(self.base.keys())
        for name, update, shape in updates:
            target = mapping.to_reference(name) or name
            if target not in base_keys:
                raise CheckpointError(
                    f"LoRA adapter {self.path} adapts module '{update.module}' but base {self.base.path} has no tensor "
                    f"'{target}' (key mapping: {mapping.describe()}); the adapter was trained on a different "
                    "model — pass its own base with --base (base= in Python)"
                )
            self._place_update(target, update, shape)
        for name, key in full.items():
            self._place_full(mapping.to_reference(name), name, key, base_keys)

    def _place_update(self, target: str, update: LoraUpdate, shape: tuple[int, ...]) -> None:
        """Check one LoRA update against the base tensor ``target`` it changes, then record it."""
        base_shape = tuple(self.base.shape(target))
        if base_shape != shape:
            hint = ""
            if not update.bias and len(shape) == 2 and base_shape == shape[::-1]:
                hint = f" (the transposed update fits: set fan_in_fan_out to {not update.transpose} in {ADAPTER_CONFIG})"
            raise CheckpointError(
                f"LoRA adapter {self.path}: tensor '{target}' has shape {list(base_shape)} in base {self.base.path} "
                f"but the adapter's update for module '{update.module}' has shape {list(shape)}{hint}; the adapter "
                "was trained on a different base — pass its own base with --base (base= in Python)"
            )
        if not self.base.dtype(target).is_floating_point:
            raise CheckpointError(
                f"LoRA adapter {self.path} adapts '{target}', which is not floating point in {self.base.path}"
            )
        self._updates.setdefault(target, []).append(update)

    def _place_full(self, target: str | None, name: str, key: str, base_keys: set[str]) -> None:
        """A saved full tensor (modules_to_save) replaces its base tensor, or is an extra tensor of the output."""
        if target is None or target not in base_keys:
            extra = target or name
            if extra in base_keys or extra in self._extra:
                raise CheckpointError(
                    f"LoRA adapter {self.path}: saved tensor '{key}' cannot be placed in the base's layout"
                )
            self._extra[extra] = key
            return
        base_shape, shape = tuple(self.base.shape(target)), tuple(self.adapter.shape(key))
        if base_shape != shape:
            raise CheckpointError(
                f"LoRA adapter {self.path}: saved tensor '{key}' (modules_to_save) has shape {list(shape)} but "
                f"'{target}' has shape {list(base_shape)} in base {self.base.path}; the adapter was trained on a "
                "different base (or resized it) — pass its own base with --base (base= in Python)"
            )
        self._replaced[target] = key

    def _module_updates(self, module: str, parts: dict[str, str]) -> list[tuple[str, LoraUpdate, tuple[int, ...]]]:
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_part not in parts or b_part not in parts:
            missing = a_part if a_part not in parts else b_part
            raise CheckpointError(
                f"LoRA adapter {self.path}: module '{module}' has no {missing} tensor; the adapter is incomplete — re-save it"
            )
        selected = targets_module(self.config, module)
        if selected is False:
            raise CheckpointError(
                f"LoRA adapter {self.path} holds LoRA factors for module '{module}', which its {ADAPTER_CONFIG} does not "
                f"target (target_modules {self.config.get('target_modules')!r}); the config and the weights disagree — "
                "fix target_modules or re-save the adapter"
            )
        a_key, b_key = parts[a_part], parts[b_part]
        a_shape, b_shape = tuple(self.adapter.shape(a_key)), tuple(self.adapter.shape(b_key))
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(
                f"LoRA adapter {self.path}: module '{module}' has {len(a_shape)}-d LoRA factors (a convolution?); only "
                f"LoRA on linear and embedding layers is supported — {_FIX}"
            )
        r, alpha = rank_and_alpha(self.config, module)
        if a_shape[0] != r or b_shape[1] != r:
            raise CheckpointError(
                f"LoRA adapter {self.path}: module '{module}' has factors of rank {a_shape[0]} (lora_A {list(a_shape)}, "
                f"lora_B {list(b_shape)}) but {ADAPTER_CONFIG} gives it r={r} (r / rank_pattern); fix the config or "
                "re-save the adapter"
            )
        scaling = alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)
        transpose = True if embedding else bool(self.config.get("fan_in_fan_out"))
        delta_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        out = [(f"{module}.weight", LoraUpdate(module, a_key, b_key, scaling, transpose), delta_shape)]
        if "lora_B.bias" in parts:  # lora_bias: the merged bias gains scaling · B.bias
            bias_key = parts["lora_B.bias"]
            out.append((f"{module}.bias", LoraUpdate(module, a_key, bias_key, scaling, bias=True),
                        tuple(self.adapter.shape(bias_key))))  # fmt: skip
        return out


def read_adapter_config(folder: Path) -> dict[str, Any]:
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a valid adapter config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a valid adapter config (a JSON object is expected)")
    return config


def check_supported(config: Mapping[str, Any], folder: Path) -> None:
    """Refuse everything that is not a plain LoRA adapter, naming what it is."""
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type != "LORA":
        kind = (
            f"a PEFT adapter of type {peft_type}"
            if peft_type
            else f"an adapter without a peft_type in its {ADAPTER_CONFIG}"
        )
        raise CheckpointError(f"{folder} is {kind}; only LoRA adapters (peft_type LORA) are supported — {_FIX}")
    for field_name, variant in _VARIANTS.items():
        if config.get(field_name):
            raise CheckpointError(f"{folder} is a {variant} adapter; only plain LoRA adapters are supported — {_FIX}")
    if config.get("r") is None or config.get("lora_alpha") is None:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} lacks 'r' or 'lora_alpha'; re-save the adapter with PEFT")


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the end of the module path (a regex, matched
    whole, on a '.' boundary)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def rank_and_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    r = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    if r <= 0:
        raise CheckpointError(f"adapter config gives module '{module}' rank r={r}; r must be positive")
    return r, alpha


def _layer_index(module: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module)
            if match:
                break
    return int(match.group(1)) if match else None


def targets_module(config: Mapping[str, Any], module: str) -> bool | None:
    """Whether ``target_modules`` (with ``exclude_modules``, ``modules_to_save`` and ``layers_to_transform``)
    selects ``module``, as PEFT decides it; None when the config cannot say (no list, or 'all-linear')."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module):
                return False
        elif module in excluded or any(module.endswith(f".{e}") for e in excluded):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def open_adapter_weights(folder: Path) -> CheckpointReader:
    if (folder / ADAPTER_SAFETENSORS).is_file():
        return SafetensorsReader([folder / ADAPTER_SAFETENSORS], str(folder / ADAPTER_SAFETENSORS))
    if (folder / ADAPTER_TORCH).is_file():
        return StateDictReader(load_torch_weights(folder / ADAPTER_TORCH), str(folder / ADAPTER_TORCH))
    raise CheckpointError(
        f"adapter folder {folder} has no {ADAPTER_SAFETENSORS} or {ADAPTER_TORCH}; re-save it with PEFT"
    )


def _is_reader(obj: object) -> bool:
    return not isinstance(obj, Mapping) and all(hasattr(obj, a) for a in ("keys", "get", "shape", "dtype"))


def recorded_base(folder: Path, config: Mapping[str, Any]) -> Path | None:
    """The adapter's ``base_model_name_or_path`` when it is a local folder (relative: to the working directory,
    then to the adapter folder), else None (a Hub id, or a folder that is not here)."""
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    path = Path(name).expanduser()
    for candidate in [path] if path.is_absolute() else [path, folder / path]:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _location(reader: CheckpointReader) -> Path | None:
    path = Path(reader.path)
    return path.resolve() if path.exists() else None


def same_checkpoint(a: Path, b: Path) -> bool:
    """Same place (a folder, or a weights file in it), or the same content (``checkpoint_fingerprint``)."""
    a, b = a.resolve(), b.resolve()
    if a == b or (a.is_file() and a.parent == b) or (b.is_file() and b.parent == a):
        return True
    try:
        return checkpoint_fingerprint(a) == checkpoint_fingerprint(b)
    except CheckpointError:
        return False


def _stacked(folder: Path, base: object) -> CheckpointError:
    return CheckpointError(
        f"the base of LoRA adapter {folder} is itself an adapter ({base}); stacked adapters are not supported — "
        "merge_and_unload() the first one and use the saved model as the base"
    )


def resolve_base(folder: Path, config: Mapping[str, Any], base: Any = None) -> CheckpointReader:
    """The adapter's base: ``base`` (a path, state dict or reader) when given, else its ``base_model_name_or_path``
    when that is a local folder. Both given and different (path and content) is an error naming both."""
    recorded = recorded_base(folder, config)
    if base is None:
        if recorded is None:
            raise CheckpointError(
                f"LoRA adapter {folder} needs its base model, and its base_model_name_or_path "
                f"{config.get('base_model_name_or_path')!r} is not a local folder; pass the base with --base "
                "(base= in Python)"
            )
        if is_adapter_folder(recorded):
            raise _stacked(folder, recorded)
        return open_weights(recorded)
    if isinstance(base, (str, os.PathLike)) and is_adapter_folder(base):
        raise _stacked(folder, base)
    reader = base if _is_reader(base) else open_weights(base)
    if isinstance(reader, AdapterReader):
        raise _stacked(folder, reader.path)
    given = _location(reader)
    if recorded is not None and given is not None and not same_checkpoint(given, recorded):
        raise CheckpointError(
            f"LoRA adapter {folder} was trained on {recorded} (its base_model_name_or_path) but the base given is "
            f"{given}, a different checkpoint; pass the adapter's own base, or fix base_model_name_or_path in "
            f"{folder / ADAPTER_CONFIG}"
        )
    return reader


def open_adapter(folder: str | os.PathLike[str], base: Any = None) -> AdapterReader:
    """Open a PEFT LoRA adapter folder applied to its base (see :func:`resolve_base`)."""
    path = Path(folder)
    config = read_adapter_config(path)
    check_supported(config, path)  # before touching the base: an unsupported adapter fails fast
    return AdapterReader(path, resolve_base(path, config, base), config)


def shared_base(readers: Sequence[CheckpointReader]) -> CheckpointReader | None:
    """The base the adapters among ``readers`` share (None when there is no adapter); adapters on different bases
    are an error (then the merge needs an explicit base)."""
    adapters = [r for r in readers if isinstance(r, AdapterReader)]
    if not adapters:
        return None
    first = adapters[0]
    for other in adapters[1:]:
        a, b = _location(first.base), _location(other.base)
        if other.base is not first.base and (a is None or b is None or not same_checkpoint(a, b)):
            raise CheckpointError(
                f"LoRA adapters {first.path} and {other.path} name different bases ({first.base.path} and "
                f"{other.base.path}); pass the base to merge onto with --base (base= in Python)"
            )
    return first.base
