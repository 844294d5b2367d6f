"""RegMean (Jin et al., ICLR 2023; algorithms.md §6): merge every Linear layer by the closed-form least-squares fit
to each expert's outputs on its own inputs; every other float tensor is averaged.

Per Linear layer y = W x: G_t = X_tᵀ X_t / n_t over the layer's inputs on task t's unlabelled **train** inputs
(token-averaged, padding tokens excluded through the attention mask), off-diagonals shrunk by ``alpha``
(G̃_t = α G_t + (1 − α) diag(G_t); FusionBench CLIP 0.95, the original 1.0 = none), and

    Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ        (float64, Cholesky).

If Σ_t G̃_t is not positive definite (e.g. α = 1 and fewer tokens than input dimensions), the solve falls back to a
ridge pulled towards the simple average W̄ instead of failing: Wᵀ = (A + εI)⁻¹ (B + ε W̄ᵀ) with
ε = ``RIDGE`` · mean(diag A) = 1e-6 · mean(diag A). That is the minimiser of Σ_t ‖X_t(W − W_t)ᵀ‖² + ε‖W − W̄‖², so a
single model still maps to itself. Grams are accumulated expert by expert, so memory holds one Σ G̃ and one
Σ G̃ Wᵀ per layer rather than T Grams.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import module_device, placed, to_device
from mergelab.core.errors import DataError
from mergelab.core.sampling import uniform_subset
from mergelab.learned.base import (
    DataMergeMethod,
    ExpertSet,
    State,
    assemble,
    check_layouts,
    float_names,
    tokenize,
)
from mergelab.learned.experts import expert_set_from_texts
from mergelab.merging.spec import MethodParams, MethodSpec

RIDGE = 1e-6


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): scale the off-diagonal entries by α."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def solve_normal_equations(lhs: torch.Tensor, rhs: torch.Tensor, mean_weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] from A = Σ G̃_t [in, in] and B = Σ G̃_t W_tᵀ [in, out]; ridge towards ``mean_weight`` when A is
    not positive definite (module doc)."""
    lhs, rhs = lhs.double(), rhs.double()
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
        if bool(torch.isfinite(solution).all()):
            return solution.T
    scale = float(torch.diagonal(lhs).mean())
    if not scale > 0:  # no signal at all (all-zero inputs): the average is as good as anything
        return mean_weight.double().clone()
    ridge = RIDGE * scale
    eye = torch.eye(lhs.shape[0], dtype=torch.float64)
    return torch.linalg.solve(lhs + ridge * eye, rhs + ridge * mean_weight.double().T).T


def regmean_solve(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """The merged weight [out, in] from each expert's input Gram [in, in] and weight [out, in]."""
    lhs = sum(shrink(g.double(), alpha) for g in grams)
    rhs = sum(shrink(g.double(), alpha) @ w.double().T for g, w in zip(grams, weights, strict=True))
    mean = torch.stack([w.double() for w in weights]).mean(0)
    return solve_normal_equations(lhs, rhs, mean).to(weights[0].dtype)


def linear_input_grams(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Token-averaged XᵀX of the inputs of every ``nn.Linear`` of ``model`` (keyed '<module>.weight'), counting only
    the tokens whose ``attention_mask`` is 1 for [B, L, d] inputs (2-D inputs such as a pooler's count every row).
    Batches run on the model's device; the Grams come back on the CPU."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_holder: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _output: torch.Tensor) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            mask = mask_holder[0]
            if x.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(hook(f"{n}.weight" if n else "weight"), with_kwargs=True) for n, m in linears]
    device = module_device(model)
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                mask_holder[0] = batch.get("attention_mask")
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / max(counts[name], 1)).float().cpu() for name, total in sums.items()}  # solved on the CPU


class RegMeanAccumulator:
    """Running Σ_t G̃_t and Σ_t G̃_t W_tᵀ per Linear weight, plus Σ_t θ_t for every float tensor."""

    def __init__(self, base: Mapping[str, torch.Tensor], alpha: float) -> None:
        self.base, self.alpha = base, alpha
        self.lhs: dict[str, torch.Tensor] = {}
        self.rhs: dict[str, torch.Tensor] = {}
        self.gram_counts: dict[str, int] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.models = 0

    def add(self, state: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor]) -> None:
        for name in float_names(self.base):
            value = state[name].double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        for name, gram in grams.items():
            if name not in self.base or not self.base[name].is_floating_point() or self.base[name].dim() != 2:
                continue
            shrunk = shrink(gram.double(), self.alpha)
            product = shrunk @ state[name].double().T
            self.lhs[name] = self.lhs[name] + shrunk if name in self.lhs else shrunk
            self.rhs[name] = self.rhs[name] + product if name in self.rhs else product
            self.gram_counts[name] = self.gram_counts.get(name, 0) + 1
        self.models += 1

    def result(self) -> State:
        merged = {name: total / self.models for name, total in self.sums.items()}
        for name, lhs in self.lhs.items():
            if self.gram_counts[name] == self.models:  # a Linear every expert ran; otherwise keep the average
                merged[name] = solve_normal_equations(lhs, self.rhs[name], merged[name])
        return assemble(self.base, merged)


def regmean_merge(
    base_state: Mapping[str, torch.Tensor],
    expert_states: Sequence[Mapping[str, torch.Tensor]],
    expert_grams: Sequence[Mapping[str, torch.Tensor]],
    alpha: float = 0.95,
) -> State:
    """Linear weights by the RegMean solve; other float tensors averaged; integer buffers from the base."""
    accumulator = RegMeanAccumulator(base_state, alpha)
    for state, grams in zip(expert_states, expert_grams, strict=True):
        accumulator.add(state, grams)
    return accumulator.result()


class RegMeanParams(MethodParams):
    alpha: float = Field(
        0.95, ge=0.0, le=1.0, description="off-diagonal Gram shrinkage (1 = none; FusionBench CLIP 0.95)"
    )
    num_examples: int = Field(256, ge=1, description="unlabelled train inputs per task for the Grams (FusionBench 256)")


class RegMean(DataMergeMethod):
    """RegMean: closed-form least squares per Linear layer from each expert's input Grams (module doc)."""

    spec = MethodSpec(
        "regmean",
        "RegMean: closed-form least squares per Linear layer from the experts' input Grams; the rest averaged",
        RegMeanParams,
        reads="train",
        runs="in_memory",
    )
    params: RegMeanParams

    def merge(self, experts: ExpertSet) -> State:
        base = experts.base_encoder().model.state_dict()
        states = experts.expert_states()
        check_layouts(base, states, experts.tasks)
        accumulator = RegMeanAccumulator(base, self.params.alpha)
        for index, (expert, state) in enumerate(zip(experts.experts, states, strict=True)):
            chosen = uniform_subset(len(expert.texts), self.params.num_examples, experts.seed + index).tolist()
            if not chosen:
                raise DataError(f"task '{expert.task}' has no inputs to compute RegMean Grams from")
            texts = [expert.texts[i] for i in chosen]
            batches = tokenize(expert.model.encoder.tokenizer, texts, experts.max_length, experts.batch_size)
            with placed(expert.model.encoder.model, experts.device) as model:
                grams = linear_input_grams(model, batches)
            accumulator.add(state, grams)
        solved = [n for n, c in accumulator.gram_counts.items() if c == accumulator.models]
        self.info = {"solved_linear_weights": len(solved)}
        return accumulator.result()


def regmean(
    base_path: str,
    expert_paths: Sequence[str],
    texts: Sequence[Sequence[str]],
    alpha: float = 0.95,
    num_examples: int = 256,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 32,
    seed: int = 0,
) -> State:
    """RegMean of HF classifier folders, each expert's Grams from its own unlabelled ``texts`` (convenience wrapper)."""
    experts = expert_set_from_texts(
        base_path, expert_paths, texts, max_length=max_length, batch_size=batch_size, seed=seed
    )
    return RegMean(RegMeanParams(alpha=alpha, num_examples=num_examples), len(expert_paths)).merge(experts)
