"""AdaMerging (Yang et al., ICLR 2024; algorithms.md §7): learn merging coefficients by minimising the prediction
entropy of each task's head on unlabelled **test** inputs of that task. Transductive: it learns from the very inputs
that are scored afterwards.

θ(λ) = θ₀ + Σ_t λ_t^ℓ τ_t^ℓ with one coefficient per (task, parameter tensor) for ``granularity="layer"`` or one per
task for ``"task"``; θ₀'s coefficient is fixed at 1. Init 0.3, Adam(lr 1e-3, betas (0.9, 0.999)), λ clamped to [0, 1]
in the forward pass as the original (``clamp=False`` as FusionBench). Loss per step: Σ_t mean-entropy of
softmax(h_t(f(x; θ(λ)))) on one shuffled batch of 16 test inputs per task (FusionBench; the original takes two), with
ε = 1e-8 inside the log. The encoder runs through ``torch.func.functional_call`` with the merged parameters, so the
gradient reaches λ; the experts, the base and the heads are never modified. ``plus=True`` is AdaMerging++: the τ_t
are replaced by the TIES-trimmed (keep 20% globally), sign-elected entries (``ops.ties_selected_vectors``), so at
zero steps AdaMerging++ with one coefficient per task λ is TIES (global, dis-sum) with scale λ.

CPU-sized default: 100 steps (the original runs 500, FusionBench 1000); with lr 1e-3 a coefficient moves by at most
about lr per step, so raise ``steps`` (or ``lr``) when a GPU is available.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from mergelab.core.device import placed, to_device
from mergelab.core.errors import DataError
from mergelab.core.sampling import uniform_subset
from mergelab.learned.base import (
    DataMergeMethod,
    ExpertSet,
    State,
    assemble,
    check_layouts,
    expert_task_vectors,
)
from mergelab.merging.ops import ties_selected_vectors
from mergelab.merging.spec import MethodParams, MethodSpec
from mergelab.models.hf import pool

Granularity = Literal["layer", "task"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch (ε 1e-8 inside the log, as FusionBench)."""
    probs = logits.float().softmax(-1)
    return -(probs * (probs + 1e-8).log()).sum(-1).mean()


def merged_parameters(
    base: Mapping[str, torch.Tensor],
    taus: Sequence[Mapping[str, torch.Tensor]],
    coefficients: torch.Tensor,
    names: Sequence[str],
    clamp: bool,
) -> State:
    """θ₀ + Σ_t λ[t, ℓ] τ_t for every name ℓ (λ is [T, L] or [T, 1]), differentiable in λ."""
    lam = coefficients.clamp(0.0, 1.0) if clamp else coefficients
    out = {}
    for index, name in enumerate(names):
        column = lam[:, index if lam.shape[1] > 1 else 0]
        out[name] = base[name] + sum(column[t] * tau[name] for t, tau in enumerate(taus))
    return out


def learn_coefficients(
    model: nn.Module,
    features_of: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor],
    base: Mapping[str, torch.Tensor],
    taus: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[nn.Module],
    batches: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    granularity: Granularity = "layer",
    steps: int = 100,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on λ [T, L or 1] minimising Σ_t entropy(h_t(f(batch_t; θ(λ)))); ``batches[t][step % len]`` is task t's
    batch at a step. Returns the final (unclamped) λ and the loss before each step. λ lives on the device of
    ``base`` (the model, heads, task vectors and batches are expected there too)."""
    names = list(taus[0])
    device = base[names[0]].device
    shape = (len(taus), len(names) if granularity == "layer" else 1)
    coefficients = torch.full(shape, float(init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    model.eval()
    for head in heads:
        head.eval()
    losses = []
    for step in range(steps):
        params = merged_parameters(base, taus, coefficients, names, clamp)
        loss = torch.zeros((), device=device)
        for head, task_batches in zip(heads, batches, strict=True):
            batch = task_batches[step % len(task_batches)]
            output = functional_call(model, params, args=(), kwargs=dict(batch))
            loss = loss + entropy(head(features_of(output, batch)))
        (coefficients.grad,) = torch.autograd.grad(loss, [coefficients])  # no side effects on model or heads
        optimizer.step()
        losses.append(float(loss.detach()))
    return coefficients.detach(), losses


def adamerging(
    model: nn.Module,
    features_of: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor],
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[nn.Module],
    batches: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    granularity: Granularity = "layer",
    steps: int = 100,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = True,
    plus: bool = False,
    density: float = 0.2,
) -> tuple[State, list[float]]:
    """AdaMerging of ``experts`` (state dicts of ``model``'s architecture, same names as ``base``): the merged state
    dict (every key of ``base``) and the loss per step. ``features_of(model_output, batch)`` gives the heads' input."""
    names = [n for n, p in model.named_parameters() if n in base and base[n].is_floating_point()]
    taus = expert_task_vectors(base, experts, names)
    if plus:
        taus = ties_selected_vectors(taus, density)
    base_f = {n: base[n].float() for n in names}
    coefficients, losses = learn_coefficients(
        model, features_of, base_f, taus, heads, batches, granularity, steps, lr, init, clamp
    )
    with torch.no_grad():
        merged = merged_parameters(base_f, taus, coefficients, names, clamp)
    return assemble(base, merged), losses


def shuffled_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int, count: int, max_length: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """``count`` padded batches drawn from successive seeded shuffles of ``texts`` (reshuffled after each pass)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(count):
        if len(order) < min(batch_size, len(texts)):
            order += torch.randperm(len(texts), generator=generator).tolist()
        take, order = order[:batch_size], order[batch_size:]
        out.append(dict(tokenizer.pad({k: [encoded[k][i] for i in take] for k in encoded}, return_tensors="pt")))
    return out


class AdaMergingParams(MethodParams):
    granularity: Granularity = Field("layer", description="one coefficient per (task, tensor) or one per task")
    steps: int = Field(
        100, ge=0, le=100_000, description="Adam steps (CPU default; the original 500, FusionBench 1000)"
    )
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Adam learning rate on the coefficients (original 1e-3)")
    init: float = Field(0.3, ge=-10.0, le=10.0, description="initial coefficient, the 'prior' (original 0.3)")
    clamp: bool = Field(
        True, description="clamp coefficients to [0, 1] in the forward pass (original; FusionBench: no)"
    )
    plus: bool = Field(False, description="AdaMerging++: TIES-trimmed (top 20%), sign-elected task vectors")
    density: float = Field(0.2, gt=0.0, le=1.0, description="AdaMerging++ only: fraction of |τ| kept by TIES (K=20)")
    batch_size: int = Field(16, ge=1, description="unlabelled test inputs per task per step (original 16)")
    num_examples: int | None = Field(None, ge=1, description="cap on the test inputs used per task (None: all)")


class AdaMerging(DataMergeMethod):
    """AdaMerging / AdaMerging++ on unlabelled test inputs (module doc)."""

    spec = MethodSpec(
        "adamerging",
        "AdaMerging: coefficients learned by entropy minimisation on unlabelled test inputs (transductive)",
        AdaMergingParams,
        reads="test",
        runs="in_memory",
    )
    params: AdaMergingParams

    def merge(self, experts: ExpertSet) -> State:
        p = self.params
        encoder = experts.base_encoder()
        base = encoder.model.state_dict()
        states = experts.expert_states()
        check_layouts(base, states, experts.tasks)
        device = experts.device
        batches = []
        for index, expert in enumerate(experts.experts):
            chosen = uniform_subset(len(expert.texts), p.num_examples, experts.seed + index).tolist()
            if not chosen:
                raise DataError(f"task '{expert.task}' has no test inputs for AdaMerging")
            texts = [expert.texts[i] for i in chosen]
            task_batches = shuffled_batches(
                encoder.tokenizer, texts, p.batch_size, max(p.steps, 1), experts.max_length, experts.seed + index
            )
            batches.append([to_device(batch, device) for batch in task_batches])
        names = [n for n, t in encoder.model.named_parameters() if t.is_floating_point()]
        taus = expert_task_vectors(base, states, names)
        if p.plus:
            taus = ties_selected_vectors(taus, p.density)
        base_f = {n: base[n].float().to(device) for n in names}
        taus = [{n: tau[n].to(device) for n in names} for tau in taus]

        def features_of(output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return pool(output, batch.get("attention_mask"), encoder.pooling)

        heads = [e.model.head for e in experts.experts]
        with contextlib.ExitStack() as stack:
            for module in (encoder.model, *heads):
                stack.enter_context(placed(module, device))
            coefficients, losses = learn_coefficients(
                encoder.model, features_of, base_f, taus, heads, batches, p.granularity, p.steps, p.lr, p.init, p.clamp
            )
        with torch.no_grad():
            merged = merged_parameters(base_f, taus, coefficients, names, p.clamp)  # assemble brings it to the CPU
        used = coefficients.clamp(0.0, 1.0) if p.clamp else coefficients
        self.info = {
            "losses": losses,
            "coefficients": used.tolist(),
            "tensor_names": names if used.shape[1] > 1 else [],
        }
        return assemble(base, merged)
