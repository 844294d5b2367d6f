"""CART: weight average plus λ times the low-rank parts of the centred task vectors θ_t − θ_avg."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from pydantic import Field, field_validator

from mergelab.core.errors import ConfigError
from mergelab.merging.base import MergeMethod
from mergelab.merging.ops import rank_from_ratio, truncated_svd
from mergelab.merging.spec import MethodParams, MethodSpec

DEFAULT_RANK_RATIO = 0.12

DEFAULT_LOWRANK_PATTERNS = (
    # BERT family / HF ViT: self-attention q/k/v, attention output, intermediate and output dense
    r"\.attention\.(self|attention)\.(query|key|value)\.weight$",
    r"\.(attention\.output|intermediate|output)\.dense\.weight$",
    # DistilBERT
    r"\.attention\.(q_lin|k_lin|v_lin|out_lin)\.weight$",
    r"\.ffn\.(lin1|lin2)\.weight$",
    # HF CLIP / ViT-style q/k/v/out projections and MLP
    r"\.(q_proj|k_proj|v_proj|out_proj)\.weight$",
    r"\.mlp\.(fc1|fc2)\.weight$",
    # open_clip: fused QKV, attention output, MLP
    r"(^|\.)attn\.in_proj_weight$",
    r"(^|\.)attn\.out_proj\.weight$",
    r"(^|\.)mlp\.(c_fc|c_proj)\.weight$",
)


class CartParams(MethodParams):
    rank_ratio: float = Field(
        DEFAULT_RANK_RATIO, gt=0.0, le=1.0, description="rank r = max(1, ⌊ρ·min(m, n)⌋) of each centred matrix"
    )
    energy: float | None = Field(
        None, gt=0.0, le=1.0, description="instead of rank_ratio: smallest rank keeping this share of Σσ²"
    )
    scale: float = Field(2.0, description="λ (CART config `prior`) on the summed low-rank centred vectors")
    lowrank_patterns: list[str] | None = Field(
        None,
        description="regexes (re.search) of the 2-D weights that get the low-rank step "
        "(default: attention/MLP weights of BERT, DistilBERT, HF CLIP/ViT, open_clip)",
    )

    @field_validator("lowrank_patterns")
    @classmethod
    def _compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns


class Cart(MergeMethod):
    """CART (algorithms.md §12): θ = θ_avg + λ Σ_t LR_r(θ_t − θ_avg) on the selected 2-D weights, θ_avg elsewhere.

    Reference: JH-GEECS/CART ``src/merging.py`` with ``configs/CART/ViT-b-32_8_CART.yaml`` (ρ = 0.12,
    ``prior`` λ = 2.0). The reference picks keys containing "attn"/"mlp" but not "ln"/"bias"; here the choice is
    the ``lowrank_patterns`` regexes (weights only) covering BERT, DistilBERT, HF CLIP/ViT and open_clip names,
    and only 2-D tensors. Elsewhere Σ_t c_t = 0, so those tensors are exactly θ_avg. No base is needed.

    Rank rule: ``rank_ratio`` by default; with ``energy`` set, each c_t gets the smallest rank holding that share
    of its Σσ² (the reference's energy mode) and ``rank_ratio`` is ignored. Giving ``energy`` together with a
    ``rank_ratio`` other than the default is an error. A full rank skips the SVD (LR_r(c) = c).
    """

    spec = MethodSpec(
        "cart", "CART: weight average plus λ times low-rank centred task vectors", CartParams, needs_base=False
    )
    params: CartParams

    def __init__(self, params: CartParams, num_models: int) -> None:
        super().__init__(params, num_models)
        if params.energy is not None and params.rank_ratio != DEFAULT_RANK_RATIO:
            raise ConfigError(
                f"CART got both energy={params.energy} and rank_ratio={params.rank_ratio}; "
                "give only one of them (energy picks the rank by σ² share)"
            )
        patterns = DEFAULT_LOWRANK_PATTERNS if params.lowrank_patterns is None else params.lowrank_patterns
        self._patterns = tuple(re.compile(p) for p in patterns)

    def is_lowrank(self, name: str, shape: torch.Size) -> bool:
        """Whether the tensor ``name`` gets the low-rank step (a 2-D tensor matching a pattern)."""
        return len(shape) == 2 and any(p.search(name) for p in self._patterns)

    def merge_tensor(self, name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(models))
        average = stacked.mean(0)
        if not self.is_lowrank(name, average.shape):
            return average
        delta = torch.zeros_like(average)
        for model in stacked:
            centred = model - average
            if self.params.energy is not None:
                delta += truncated_svd(centred, energy=self.params.energy)
            else:
                delta += truncated_svd(centred, rank=rank_from_ratio(centred.shape, self.params.rank_ratio))
        return average + self.params.scale * delta
