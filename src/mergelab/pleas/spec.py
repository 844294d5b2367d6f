"""Permutation groups: which tensor axes and which activations carry the same hidden units.

A ``PermutationSpec`` is declared by hand per architecture (``mlp_spec``, ``resnet_spec``):

* ``axes`` maps every float tensor of the merged part of the model to one group name (or ``None``) per axis.
  Units on axes with the same group are permuted / split together, e.g. the output channels of a conv, its
  batch-norm vectors and the input channels of the next conv. Units tied through a residual add share a group.
* ``nodes`` maps each group to the modules whose output carries that group's units on dim 1 (used for
  activation matching; the ReLU after the unit, or the post-add ReLU of a residual block).
* ``layers`` lists the Conv2d / Linear modules, input to output (least squares and FLOPs).
* ``head`` names the task head left out of the merge (separate label spaces); the merged model gets an
  ``nn.Identity`` there, so calling it returns features. ``None`` merges the head too (shared label space).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.pleas.models import MLP, SmallResNet

AxisGroups = tuple[str | None, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """Hand-declared permutation groups of one architecture (see the module docstring)."""

    axes: Mapping[str, AxisGroups]
    nodes: Mapping[str, tuple[str, ...]]
    layers: tuple[str, ...]
    head: str | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """Group names, input to output (the declaration order of ``nodes``)."""
        return tuple(self.nodes)

    @property
    def feature_group(self) -> str | None:
        """The group whose units are the model's features (the separate head's input): the output group of the
        last merged layer; None when the head is merged too (the model then returns logits)."""
        if self.head is None or not self.layers:
            return None
        return self.layer_groups(self.layers[-1])[0]

    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """For each group, the (tensor name, axis) pairs it permutes."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.groups}
        for name, groups in self.axes.items():
            for axis, group in enumerate(groups):
                if group is not None:
                    out[group].append((name, axis))
        return out

    def layer_groups(self, layer: str) -> tuple[str | None, str | None]:
        """(output group, input group) of a Conv2d / Linear layer."""
        groups = self.axes[f"{layer}.weight"]
        return groups[0], groups[1]

    def merged_state_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys of ``model`` that belong to the merged part (everything but the separate head)."""
        prefix = f"{self.head}." if self.head else None
        return [k for k in model.state_dict() if prefix is None or not k.startswith(prefix)]

    def group_sizes(self, model: nn.Module) -> dict[str, int]:
        """Number of units per group in ``model``; checks the spec against the model (``ConfigError``)."""
        self.validate(model)
        state = model.state_dict()
        sizes: dict[str, int] = {}
        for name, groups in self.axes.items():
            for axis, group in enumerate(groups):
                if group is not None:
                    sizes.setdefault(group, state[name].shape[axis])
        return {g: sizes[g] for g in self.groups}

    def validate(self, model: nn.Module) -> None:
        """Raise ``ConfigError`` if the spec does not describe ``model`` exactly."""
        state = model.state_dict()
        float_keys = {k for k in self.merged_state_keys(model) if state[k].is_floating_point()}
        missing, extra = float_keys - set(self.axes), set(self.axes) - float_keys
        if missing or extra:
            raise ConfigError(
                f"permutation spec does not match the model: tensors without axes {sorted(missing)}, "
                f"unknown tensors {sorted(extra)}; build the spec with the builder for this architecture"
            )
        unknown = {g for groups in self.axes.values() for g in groups if g is not None} - set(self.groups)
        if unknown:
            raise ConfigError(f"permutation spec uses groups {sorted(unknown)} that have no activation nodes")
        sizes: dict[str, int] = {}
        for name, groups in self.axes.items():
            if len(groups) != state[name].ndim:
                raise ConfigError(
                    f"spec gives {len(groups)} axes for '{name}' of shape {tuple(state[name].shape)}"
                )
            for axis, group in enumerate(groups):
                if group is None:
                    continue
                size = state[name].shape[axis]
                if sizes.setdefault(group, size) != size:
                    raise ConfigError(
                        f"group '{group}' has size {sizes[group]} but '{name}' axis {axis} has {size}"
                    )
        modules = dict(model.named_modules())
        for group, names in self.nodes.items():
            for name in names:
                if name not in modules:
                    raise ConfigError(
                        f"activation node '{name}' of group '{group}' is not a module of the model"
                    )
        for layer in self.layers:
            module = modules.get(layer)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ConfigError(
                    f"layer '{layer}' must be an nn.Linear or nn.Conv2d, got {type(module).__name__}"
                )
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ConfigError(f"conv '{layer}' must have groups=1 and zero padding to be merged")


def _bn_axes(prefix: str, group: str) -> dict[str, AxisGroups]:
    return {f"{prefix}.{k}": (group,) for k in ("weight", "bias", "running_mean", "running_var")}


def mlp_spec(model: nn.Module, merge_head: bool = False) -> PermutationSpec:
    """Spec of ``pleas.models.MLP``: one group per hidden layer (``hidden0``, ``hidden1``, ...)."""
    fcs = [name for name, m in model.body.named_children() if isinstance(m, nn.Linear)]
    axes: dict[str, AxisGroups] = {}
    nodes: dict[str, tuple[str, ...]] = {}
    layers = []
    prev: str | None = None
    for i, fc in enumerate(fcs):
        group = f"hidden{i}"
        axes[f"body.{fc}.weight"] = (group, prev)
        axes[f"body.{fc}.bias"] = (group,)
        nodes[group] = (f"body.act{i}",)
        layers.append(f"body.{fc}")
        prev = group
    if merge_head:
        axes["head.weight"] = (None, prev)
        axes["head.bias"] = (None,)
        layers.append("head")
    return PermutationSpec(axes=axes, nodes=nodes, layers=tuple(layers), head=None if merge_head else "head")


def resnet_spec(model: nn.Module, merge_head: bool = False) -> PermutationSpec:
    """Spec of ``pleas.models.SmallResNet``.

    Groups: ``res{k}`` is the residual stream of stage k (stem output, or a projection shortcut's output, plus
    every block output added to it); ``block{i}.inner`` is the hidden width inside block i.
    """
    axes: dict[str, AxisGroups] = {
        "stem.conv.weight": ("res0", None, None, None),
        **_bn_axes("stem.bn", "res0"),
    }
    nodes: dict[str, list[str]] = {"res0": ["stem.relu"]}
    layers = ["stem.conv"]
    res, stage = "res0", 0
    for i, block in enumerate(model.blocks):
        p, inner = f"blocks.{i}", f"block{i}.inner"
        nodes[inner] = [f"{p}.relu1"]
        out = res
        if block.shortcut is not None:
            stage += 1
            out = f"res{stage}"
            nodes[out] = []
        axes[f"{p}.conv1.weight"] = (inner, res, None, None)
        axes.update(_bn_axes(f"{p}.bn1", inner))
        axes[f"{p}.conv2.weight"] = (out, inner, None, None)
        axes.update(_bn_axes(f"{p}.bn2", out))
        layers += [f"{p}.conv1", f"{p}.conv2"]
        if block.shortcut is not None:
            axes[f"{p}.shortcut.0.weight"] = (out, res, None, None)
            axes.update(_bn_axes(f"{p}.shortcut.1", out))
            layers.append(f"{p}.shortcut.0")
        nodes[out].append(f"{p}.relu2")
        res = out
    if merge_head:
        axes["head.weight"] = (None, res)
        axes["head.bias"] = (None,)
        layers.append("head")
    return PermutationSpec(
        axes=axes,
        nodes={g: tuple(n) for g, n in nodes.items()},
        layers=tuple(layers),
        head=None if merge_head else "head",
    )


def spec_for(model: nn.Module, merge_head: bool = False) -> PermutationSpec:
    """The hand-declared spec of a model class shipped in ``pleas.models``."""
    if isinstance(model, MLP):
        return mlp_spec(model, merge_head)
    if isinstance(model, SmallResNet):
        return resnet_spec(model, merge_head)
    raise ConfigError(
        f"no permutation spec for {type(model).__name__}; use pleas.models.MLP or SmallResNet, "
        "or declare a PermutationSpec by hand"
    )


def permute_state(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Re-index every grouped axis: ``out[name]`` takes unit ``perms[g][i]`` at position i."""
    out = dict(state)
    for name, groups in spec.axes.items():
        tensor = state[name]
        for axis, group in enumerate(groups):
            if group is not None:
                tensor = tensor.index_select(axis, perms[group])
        out[name] = tensor
    return out
