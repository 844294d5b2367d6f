"""Step 2 of PLeaS: refit every merged Conv2d / Linear layer by least squares, teacher-forced.

For layer ℓ the inputs are the ORIGINAL models' input activations, assembled in the merged layout
X̃ = [(X^A_M + X^B_P(M)) / 2 | X^A_SA | X^B_SB], and the targets are assembled the same way from the original
layer outputs Ỹ (an ungrouped axis, e.g. a shared head's logits, takes the average). Every layer is solved
independently and in closed form (this implementation's choice; the reference uses 400 Adam steps):

* Linear: W = argmin (1/N)‖X̃ Wᵀ + b − Ỹ‖² + λ‖W‖², accumulated as Gram matrices in float64.
* Conv2d: the same problem on ``unfold``-ed patches (one row per output position), which is exactly the
  convolution written as a matrix product; ``positions_per_image`` optionally subsamples positions (seeded).

The A-only ↔ B-only cross blocks stay zero: the rows of A-only outputs are solved on the [merged | A-only]
input columns only, B-only rows on [merged | B-only], merged rows on all columns. λ = ``ridge`` × the mean
diagonal of the block's Gram matrix (bias column excluded, not penalised); ``ridge = 0`` gives the
minimum-norm least-squares solution (``gelsd``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.pleas.common import capture_io, iter_batches
from mergelab.pleas.partial import GroupSplit
from mergelab.pleas.spec import PermutationSpec


def assemble(xa: torch.Tensor, xb: torch.Tensor, split: GroupSplit | None) -> torch.Tensor:
    """[(A_M + B_P(M)) / 2 | A_SA | B_SB] along dim 1; the plain average when the axis is ungrouped."""
    if split is None:
        return (xa + xb) / 2
    merged = (xa.index_select(1, split.merged_a) + xb.index_select(1, split.merged_b)) / 2
    return torch.cat([merged, xa.index_select(1, split.only_a), xb.index_select(1, split.only_b)], dim=1)


def design_matrix(module: nn.Module, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the layer's input as a matrix product: [N·L, C·k·k] patches (conv) or [N·…, in] (linear)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
    )
    if positions is not None:
        cols = cols[:, :, positions]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def target_matrix(module: nn.Module, y: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Layer outputs in the row layout of ``design_matrix``: [rows, out]."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    y = y.flatten(2)
    if positions is not None:
        y = y[:, :, positions]
    return y.transpose(1, 2).reshape(-1, y.shape[1])


@dataclass
class GramAccumulator:
    """Running XᵀX, XᵀY and YᵀY (float64) of one layer, X with a trailing ones column when there is a bias."""

    bias: bool
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    target_sq: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if self.bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        gram, cross, sq = x.T @ x, x.T @ y, (y * y).sum(0)
        if self.gram is None:
            self.gram, self.cross, self.target_sq = gram, cross, sq
        else:
            self.gram += gram
            self.cross += cross
            self.target_sq += sq
        self.rows += len(x)


def solve_block(gram: torch.Tensor, cross: torch.Tensor, ridge: float, bias: bool) -> torch.Tensor:
    """argmin_W ‖XW − Y‖² + λ‖W_x‖² from XᵀX and XᵀY, λ = ridge · mean diag(XᵀX) (bias row unpenalised)."""
    n_feat = gram.shape[0] - int(bias)
    reg = gram.clone()
    if ridge > 0 and n_feat > 0:
        lam = ridge * gram.diagonal()[:n_feat].mean().clamp_min(1e-12)
        reg.diagonal()[:n_feat] += lam
    return torch.linalg.lstsq(reg, cross, driver="gelsd").solution


def _channel_columns(channels: torch.Tensor, per_channel: int) -> torch.Tensor:
    return (channels[:, None] * per_channel + torch.arange(per_channel)[None, :]).reshape(-1)


def row_blocks(
    out_split: GroupSplit | None, in_split: GroupSplit | None, out_width: int, in_width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output rows, allowed input channels) per output block; cross blocks A-only ↔ B-only excluded."""
    all_in = torch.arange(in_width)
    if out_split is None:
        return [(torch.arange(out_width), all_in)]
    blocks = []
    for role in "mab":
        rows = torch.arange(out_width)[out_split.offsets(role)]
        if len(rows) == 0:
            continue
        if in_split is None or role == "m":
            allowed = all_in
        else:
            keep = torch.ones(in_width, dtype=torch.bool)
            keep[in_split.offsets("b" if role == "a" else "a")] = False
            allowed = all_in[keep]
        blocks.append((rows, allowed))
    return blocks


def fit_layer_(
    module: nn.Module,
    acc: GramAccumulator,
    out_split: GroupSplit | None,
    in_split: GroupSplit | None,
    ridge: float,
) -> float:
    """Write the least-squares weights into ``module``; return the relative residual ‖XW − Y‖² / ‖Y‖²."""
    if acc.gram is None:
        raise ConfigError("least squares got no data for a layer; pass at least one batch of inputs")
    weight = module.weight
    out_width, in_width = weight.shape[0], weight.shape[1]
    per_channel = weight[0, 0].numel()
    new_weight = torch.zeros(out_width, in_width * per_channel, dtype=torch.float64)
    new_bias = torch.zeros(out_width, dtype=torch.float64)
    residual = 0.0
    bias_col = torch.tensor([acc.gram.shape[0] - 1]) if acc.bias else torch.zeros(0, dtype=torch.long)
    for rows, channels in row_blocks(out_split, in_split, out_width, in_width):
        feat_cols = _channel_columns(channels, per_channel)
        cols = torch.cat([feat_cols, bias_col])
        gram = acc.gram[cols][:, cols]
        cross = acc.cross[cols][:, rows]
        sol = solve_block(gram, cross, ridge, acc.bias)
        new_weight[rows[:, None], feat_cols[None, :]] = sol[: len(feat_cols)].T
        if acc.bias:
            new_bias[rows] = sol[-1]
        residual += float(acc.target_sq[rows].sum() - 2 * (sol * cross).sum() + (sol * (gram @ sol)).sum())
    with torch.no_grad():
        weight.copy_(new_weight.reshape(weight.shape).to(weight.dtype))
        if acc.bias:
            module.bias.copy_(new_bias.to(module.bias.dtype))
    return residual / max(float(acc.target_sq.sum()), 1e-30)


@dataclass
class LeastSquaresReport:
    """Relative training residual per layer (0 = the merged layer reproduces its targets exactly)."""

    relative_residual: dict[str, float] = field(default_factory=dict)


def least_squares_(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    splits: Mapping[str, GroupSplit],
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
    max_batches: int | None = None,
    ridge: float = 1e-4,
    positions_per_image: int | None = None,
    seed: int = 0,
) -> LeastSquaresReport:
    """Refit every layer of ``spec.layers`` in ``merged`` in place (see the module docstring)."""
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    if positions_per_image is not None and positions_per_image < 1:
        raise ConfigError(f"positions_per_image must be >= 1 or None, got {positions_per_image}")
    modules = dict(merged.named_modules())
    layers = list(spec.layers)
    accs = {name: GramAccumulator(bias=modules[name].bias is not None) for name in layers}
    generator = torch.Generator().manual_seed(seed)
    model_a.eval()
    model_b.eval()
    with torch.no_grad(), capture_io(model_a, layers) as io_a, capture_io(model_b, layers) as io_b:
        for batch in iter_batches(inputs, batch_size, max_batches):
            model_a(batch)
            model_b(batch)
            for name in layers:
                module = modules[name]
                g_out, g_in = spec.layer_groups(name)
                (xa, ya), (xb, yb) = io_a[name], io_b[name]
                x = assemble(xa, xb, splits[g_in] if g_in else None)
                y = assemble(ya, yb, splits[g_out] if g_out else None)
                positions = None
                if isinstance(module, nn.Conv2d) and positions_per_image is not None:
                    num = y.shape[-1] * y.shape[-2]
                    if num > positions_per_image:
                        positions = torch.randperm(num, generator=generator)[:positions_per_image]
                accs[name].add(design_matrix(module, x, positions), target_matrix(module, y, positions))
    report = LeastSquaresReport()
    for name in layers:
        g_out, g_in = spec.layer_groups(name)
        report.relative_residual[name] = fit_layer_(
            modules[name], accs[name], splits[g_out] if g_out else None, splits[g_in] if g_in else None, ridge
        )
    return report
