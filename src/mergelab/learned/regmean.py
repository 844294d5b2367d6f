"""RegMean (Jin et al., 2023): merge each Linear layer by the closed-form least-squares fit to every expert's
outputs on its own inputs; everything else is averaged.

Per Linear layer y = W x: G_t = X_tᵀ X_t / n_t (token-averaged, padding excluded), off-diagonals shrunk by ``alpha``
(G̃_t = α G_t + (1 − α) diag(G_t)), and Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ, solved in float64. A singular system falls back
to a ridge solve (ε · mean diag added) instead of failing. Reference: bloomberg/dataless-model-merging and
FusionBench ``regmean`` (α = 0.95 in the CLIP config; the original disables shrinkage, i.e. α = 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

RIDGE = 1e-6


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): scale the off-diagonal entries by α."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_solve(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """The merged weight [out, in] from each expert's input Gram [in, in] and weight [out, in] (float64 solve)."""
    lhs = sum(shrink(g.double(), alpha) for g in grams)
    rhs = sum(shrink(g.double(), alpha) @ w.double().T for g, w in zip(grams, weights, strict=True))
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular: ridge fallback
        ridge = RIDGE * float(torch.diagonal(lhs).mean().clamp(min=1e-12))
        solution = torch.linalg.solve(lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype), rhs)
    return solution.T.to(weights[0].dtype)


def linear_input_grams(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Token-averaged XᵀX of the inputs of every nn.Linear of ``model`` (keyed by '<module>.weight'), counting only
    tokens where ``attention_mask`` is 1."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_holder: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].detach()
            mask = mask_holder[0]
            if x.dim() == 3 and mask is not None and mask.shape == x.shape[:2]:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask_holder[0] = batch.get("attention_mask")
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / max(counts[name], 1)).float() for name, total in sums.items()}


def regmean_merge(base_state: Mapping[str, torch.Tensor], expert_states: Sequence[Mapping[str, torch.Tensor]],
                  expert_grams: Sequence[Mapping[str, torch.Tensor]], alpha: float = 0.95) -> dict[str, torch.Tensor]:  # fmt: skip
    """Linear weights by ``regmean_solve``; other float tensors averaged; integer buffers from the base."""
    merged = {}
    for name, base in base_state.items():
        if not base.is_floating_point():
            merged[name] = base.clone()
            continue
        tensors = [state[name].to(torch.float32) for state in expert_states]
        if all(name in grams for grams in expert_grams) and base.dim() == 2:
            merged[name] = regmean_solve([g[name] for g in expert_grams], tensors, alpha).to(base.dtype)
        else:
            merged[name] = torch.stack(tensors).mean(0).to(base.dtype)
    return merged


def regmean(base_path: str, expert_paths: Sequence[str], texts: Sequence[Sequence[str]], alpha: float = 0.95,
            num_examples: int = 256, max_length: int = 64, batch_size: int = 32) -> dict[str, torch.Tensor]:  # fmt: skip
    """RegMean of HF fine-tuned classifiers: each expert's Grams from ``num_examples`` of its own task's unlabelled
    ``texts``; returns the merged encoder state dict in the base layout."""
    from mergelab.models.hf import load_encoder, load_task_model

    base_state = load_encoder(base_path, base_path).model.state_dict()
    states, grams = [], []
    for path, task_texts in zip(expert_paths, texts, strict=True):
        encoder = load_task_model(path).encoder
        tokenizer = encoder.tokenizer
        sample = list(task_texts)[:num_examples]
        batches = (tokenizer(sample[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                             return_tensors="pt") for i in range(0, len(sample), batch_size))  # fmt: skip
        grams.append(linear_input_grams(encoder.model, batches))
        states.append(encoder.model.state_dict())
    return regmean_merge(base_state, states, grams, alpha)
