"""AdaMerging (Yang et al., ICLR 2024): learn task-wise or layer-wise merging coefficients by minimising the entropy
of each task's head on unlabelled **test** inputs (transductive).

θ(λ) = θ₀ + Σ_t λ_t^ℓ τ_t^ℓ, one coefficient per (task, parameter tensor) for ``granularity="layer"`` or per task for
``"task"``; init 0.3, Adam(lr 1e-3), λ clamped to [0, 1] in the forward pass as the original (``clamp=False`` as
FusionBench). ``plus=True`` is AdaMerging++: the task vectors are TIES-trimmed per tensor (keep 20%) and only the
entries agreeing with the elected sign are kept. The encoder runs through ``torch.func.functional_call`` with the
merged parameters, so gradients reach λ. Defaults are CPU-sized (the original uses 500 steps, batch 16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mergelab.merging.ops import elect_signs, kth_smallest_magnitude_flat, trim_rank


def ties_selected(taus: Sequence[torch.Tensor], density: float = 0.2) -> list[torch.Tensor]:
    """AdaMerging++'s task vectors: per tensor, keep each τ_t's top ``density`` magnitudes that agree in sign."""
    k = trim_rank(taus[0].numel(), density)
    trimmed = []
    for tau in taus:
        threshold = kth_smallest_magnitude_flat(tau.float(), k) if k >= 1 else torch.tensor(0.0)
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros(())))
    signs = elect_signs(torch.stack(trimmed))
    return [torch.where(torch.sign(t) == signs, t, torch.zeros(())) for t in trimmed]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch (ε 1e-8 inside the log, as FusionBench)."""
    probs = logits.softmax(-1)
    return -(probs * (probs + 1e-8).log()).sum(-1).mean()


def merged_parameters(base: Mapping[str, torch.Tensor], taus: Sequence[Mapping[str, torch.Tensor]],
                      coefficients: torch.Tensor, names: Sequence[str], clamp: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """θ₀ + Σ_t λ[t, ℓ] τ_t for every parameter ℓ in ``names`` (λ [T, L] or [T, 1]), differentiable in λ."""
    lam = coefficients.clamp(0.0, 1.0) if clamp else coefficients
    out = {}
    for index, name in enumerate(names):
        column = lam[:, index if lam.shape[1] > 1 else 0]
        out[name] = base[name] + sum(column[t] * taus[t][name] for t in range(len(taus)))
    return out


def adamerging(model: nn.Module, features_of: Callable[[Any], torch.Tensor], base: Mapping[str, torch.Tensor],
               experts: Sequence[Mapping[str, torch.Tensor]], heads: Sequence[nn.Module],
               batches: Sequence[Sequence[Mapping[str, torch.Tensor]]], granularity: str = "layer", steps: int = 50,
               lr: float = 1e-3, init: float = 0.3, clamp: bool = True, plus: bool = False,
               seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:  # fmt: skip
    """Learn λ on each task's unlabelled batches; return the merged state dict and the loss per step.

    ``model`` is the base architecture (its state-dict names match ``base``); ``features_of(model_output)`` turns its
    output into the features the heads take. ``batches[t]`` are task t's (test) input batches, cycled over steps.
    """
    torch.manual_seed(seed)
    names = [n for n, p in model.named_parameters() if n in base and base[n].is_floating_point()]
    taus = [{n: (e[n].float() - base[n].float()) for n in names} for e in experts]
    if plus:
        selected = {n: ties_selected([t[n] for t in taus]) for n in names}
        taus = [{n: selected[n][t] for n in names} for t in range(len(experts))]
    base_f = {n: base[n].float() for n in names}
    columns = len(names) if granularity == "layer" else 1
    coefficients = torch.full((len(experts), columns), init, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    for head in heads:
        head.eval().requires_grad_(False)
    model.eval()
    losses = []
    for step in range(steps):
        params = merged_parameters(base_f, taus, coefficients, names, clamp)
        loss = torch.zeros(())
        for head, task_batches in zip(heads, batches, strict=True):
            batch = task_batches[step % len(task_batches)]
            loss = loss + entropy(head(features_of(functional_call(model, params, args=(), kwargs=dict(batch)))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = merged_parameters(base_f, taus, coefficients, names, clamp)
    merged = {n: t.clone() for n, t in base.items()}
    merged.update({n: final[n].to(base[n].dtype) for n in names})
    return merged, losses
