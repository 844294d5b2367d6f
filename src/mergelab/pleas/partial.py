"""Partial matching: a merged model of width n(1 + r) per group, and per-group ratios from a FLOPs budget.

Per group with n units and s = r·n separate units, the merged layout is ``[merged (n − s) | A-only (s) |
B-only (s)]``. The n − s A-units with the highest matched similarity are merged with their B partners; the
other s A-units and their B partners are kept separate (algorithms.md §13, ``get_blocks``). With s = n the
identity pairing is used, so the merged model is the plain concatenation of A and B.

Block initialisation (``build_partial_merge_model``), for a tensor whose first axis is its output axis:
all axes merged → (A + B[P]) / 2; a block touching A-only (B-only) axes and otherwise merged axes → A's (B's)
weights, halved when the output axis is merged (a separate input feeding a merged output); blocks touching
both A-only and B-only axes → 0. Ungrouped axes (image channels, logits of a shared head) count as merged.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.pleas.matching import Matching
from mergelab.pleas.spec import AxisGroups, PermutationSpec


@dataclass(frozen=True)
class GroupSplit:
    """Unit indices of one group: merged pairs (A index, B partner) and the separate units of A and B."""

    merged_a: torch.Tensor
    merged_b: torch.Tensor
    only_a: torch.Tensor
    only_b: torch.Tensor

    @property
    def num_merged(self) -> int:
        return len(self.merged_a)

    @property
    def num_separate(self) -> int:
        return len(self.only_a)

    @property
    def width(self) -> int:
        """Width of the merged group: n(1 + r) = merged + 2 · separate."""
        return self.num_merged + 2 * self.num_separate

    def indices(self, role: str, model: str) -> torch.Tensor:
        """Source indices of ``model`` ('a' or 'b') for the ``role`` block ('m', 'a' or 'b')."""
        if role == "m":
            return self.merged_a if model == "a" else self.merged_b
        return self.only_a if role == "a" else self.only_b

    def offsets(self, role: str) -> slice:
        """Position of the ``role`` block in the merged layout."""
        m, s = self.num_merged, self.num_separate
        return {"m": slice(0, m), "a": slice(m, m + s), "b": slice(m + s, m + 2 * s)}[role]


def split_group(perm: torch.Tensor, scores: torch.Tensor, num_separate: int) -> GroupSplit:
    """Keep the ``n − num_separate`` best-matched pairs (highest ``scores``, ties by index) merged."""
    n = len(perm)
    if not 0 <= num_separate <= n:
        raise ConfigError(f"num_separate must be in [0, {n}], got {num_separate}")
    if num_separate == n:
        ident = torch.arange(n)
        empty = torch.zeros(0, dtype=torch.long)
        return GroupSplit(merged_a=empty, merged_b=empty, only_a=ident, only_b=ident.clone())
    order = torch.argsort(-scores.double(), stable=True)
    merged_a = order[: n - num_separate].sort().values
    only_a = order[n - num_separate :].sort().values
    return GroupSplit(merged_a=merged_a, merged_b=perm[merged_a], only_a=only_a, only_b=perm[only_a])


def split_groups(matching: Matching, num_separate: Mapping[str, int]) -> dict[str, GroupSplit]:
    """``split_group`` for every group of ``matching`` (``num_separate`` defaults to 0 per group)."""
    return {
        g: split_group(p, matching.matched_scores(g), int(num_separate.get(g, 0)))
        for g, p in matching.perms.items()
    }


def merge_tensor(
    wa: torch.Tensor, wb: torch.Tensor, groups: AxisGroups, splits: Mapping[str, GroupSplit]
) -> torch.Tensor:
    """Block initialisation of one tensor (see the module docstring)."""
    grouped = [axis for axis, g in enumerate(groups) if g is not None]
    shape = list(wa.shape)
    for axis in grouped:
        shape[axis] = splits[groups[axis]].width
    out = torch.zeros(shape, dtype=wa.dtype)
    for roles in itertools.product("mab", repeat=len(grouped)):
        if "a" in roles and "b" in roles:
            continue
        role_of = dict(zip(grouped, roles, strict=True))
        dest = tuple(
            splits[groups[ax]].offsets(role_of[ax]) if ax in role_of else slice(None) for ax in range(wa.ndim)
        )
        if any(s.stop is not None and s.stop == s.start for s in dest):
            continue

        def take(w: torch.Tensor, model: str, role_of: dict[int, str] = role_of) -> torch.Tensor:
            for ax, role in role_of.items():
                w = w.index_select(ax, splits[groups[ax]].indices(role, model))
            return w

        if "a" in roles or "b" in roles:
            block = take(wa, "a") if "a" in roles else take(wb, "b")
            if role_of.get(0, "m") == "m":
                block = block / 2
        else:
            block = (take(wa, "a") + take(wb, "b")) / 2
        out[dest] = block
    return out


def _replace_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


def _sync_shapes(model: nn.Module) -> None:
    """Update the size attributes of Linear / Conv2d / BatchNorm modules after their tensors were resized."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Conv2d):
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            source = module.weight if module.weight is not None else module.running_mean
            module.num_features = source.shape[0]


def partial_merge(
    model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, splits: Mapping[str, GroupSplit]
) -> nn.Module:
    """The initial merged model of width n(1 + r) per group (a resized copy of A; A and B are untouched).

    A separate head (``spec.head``) is replaced by ``nn.Identity`` so that the merged model returns features.
    """
    sizes = spec.group_sizes(model_a)
    if spec.group_sizes(model_b) != sizes:
        raise ConfigError("models A and B must have the same architecture and widths to be merged")
    for group, n in sizes.items():
        split = splits.get(group)
        if split is None or split.num_merged + split.num_separate != n:
            raise ConfigError(
                f"group '{group}' needs a split covering its {n} units; build it with split_groups"
            )
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    merged = copy.deepcopy(model_a)
    if spec.head is not None:
        merged.set_submodule(spec.head, nn.Identity())
    for name in spec.merged_state_keys(model_a):
        if name in spec.axes:
            value = merge_tensor(state_a[name].detach(), state_b[name].detach(), spec.axes[name], splits)
        else:
            value = state_a[name].detach().clone()
        _replace_tensor(merged, name, value)
    _sync_shapes(merged)
    return merged


def layer_macs(model: nn.Module, spec: PermutationSpec, input_shape: Sequence[int]) -> dict[str, float]:
    """Multiply-accumulates per sample of each ``spec.layers`` module at the original width."""
    modules = dict(model.named_modules())
    macs: dict[str, float] = {}
    handles = []
    for name in spec.layers:

        def hook(m: nn.Module, _args: tuple, out: torch.Tensor, name: str = name) -> None:
            if isinstance(m, nn.Conv2d):
                macs[name] = float(m.weight.numel() * out.shape[-1] * out.shape[-2])
            else:
                macs[name] = float(m.weight.numel() * (out[0].numel() // out.shape[-1]))

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return macs


def flops_ratio(spec: PermutationSpec, macs: Mapping[str, float], ratios: Mapping[str, float]) -> float:
    """FLOPs of the partially merged layers relative to one original model.

    A layer with input/output ratios r_i, r_o costs (1 + r_i)(1 + r_o) − 2 r_i r_o times the original (the
    A-only ↔ B-only cross blocks are zero and not counted); ungrouped axes have r = 0.
    """
    total = sum(macs.values())
    scaled = 0.0
    for layer, cost in macs.items():
        g_out, g_in = spec.layer_groups(layer)
        r_o = ratios.get(g_out, 0.0) if g_out else 0.0
        r_i = ratios.get(g_in, 0.0) if g_in else 0.0
        scaled += cost * ((1 + r_i) * (1 + r_o) - 2 * r_i * r_o)
    return scaled / total


def allocate_separate_units(
    spec: PermutationSpec,
    sizes: Mapping[str, int],
    macs: Mapping[str, float],
    budget: float,
    priority: Sequence[str] | None = None,
) -> dict[str, int]:
    """Per-group number of separate units s_g (ratio r_g = s_g / n_g) within a FLOPs budget b ∈ [1, 2].

    Deterministic greedy: groups are visited in ``priority`` order (default: deepest group first, i.e. the
    reverse of ``spec.groups``, following PLeaS' stage-wise ``zip`` ratios that keep later layers separate),
    and each one gets the largest s_g that keeps ``flops_ratio ≤ budget`` (binary search; the ratio is
    non-decreasing in every s_g). Later groups may still use budget a partly separated group left over.
    b = 1 gives all zeros (a full merge), b = 2 gives s_g = n_g everywhere (the concatenation).
    """
    if not 1.0 <= budget <= 2.0:
        raise ConfigError(f"budget must be in [1.0, 2.0] (1× to 2× the FLOPs of one model), got {budget}")
    order = list(priority) if priority is not None else list(reversed(spec.groups))
    if sorted(order) != sorted(spec.groups):
        raise ConfigError(f"priority must list every group exactly once: {list(spec.groups)}")
    separate = {g: 0 for g in spec.groups}

    def fits(group: str, s: int) -> bool:
        trial = {g: separate[g] / sizes[g] for g in spec.groups}
        trial[group] = s / sizes[group]
        return flops_ratio(spec, macs, trial) <= budget + 1e-9

    for group in order:
        lo, hi = 0, sizes[group]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(group, mid):
                lo = mid
            else:
                hi = mid - 1
        separate[group] = lo
    return separate


def ratios_of(separate: Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, float]:
    """r_g = s_g / n_g."""
    return {g: separate[g] / sizes[g] for g in sizes}
