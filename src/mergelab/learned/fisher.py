"""Fisher merging (Matena & Raffel, 2022; algorithms.md §5) with an exact per-example diagonal Fisher.

F_t = E_x E_{y~p_θt(·|x)} [(∇_θ log p_θt(y|x))²] over each expert's encoder parameters, from unlabelled **train**
inputs of its own task, computed one example at a time (batch size 1, no padding):

* ``label_mode="expected"`` sums over classes weighted by p: Σ_c p_c g_c² (the exact expectation; C backward passes
  per example);
* ``label_mode="sampled"`` draws y ~ p (one backward pass per example; unbiased, seeded).

Merge: θ = Σ_t c_t F̂_t θ_t / Σ_t c_t F̂_t elementwise with F̂ = F + ε (ε = 1e-6, FusionBench ``minimal_fisher_weight``)
and c_t = 1/T, or c_t ∝ 1/‖F_t‖₂ with ``normalize`` (FusionBench's default, on). Encoder tensors that received no
gradient (not used by the head's forward, e.g. an unused pooler) have no Fisher and stay at θ₀, as in FusionBench.

``fisher_batch`` is the FusionBench / MergeLM estimator kept under its own name: per batch it squares the gradient of
s = Σ_i Σ_c √p_ic·log p_ic (√p detached) and divides by the number of examples. Squaring a sum over examples and
classes adds cross terms, so it is **not** the diagonal Fisher (it differs even at batch size 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import module_device, placed, to_device
from mergelab.core.errors import DataError
from mergelab.core.sampling import uniform_subset
from mergelab.learned.base import DataMergeMethod, ExpertSet, State, assemble, check_layouts, tokenize
from mergelab.learned.experts import expert_set_from_texts
from mergelab.merging.spec import MethodParams, MethodSpec

EPSILON = 1e-6
LabelMode = Literal["expected", "sampled"]
Estimator = Callable[[nn.Module, Any, list[str], dict[str, torch.Tensor], int], dict[str, torch.Tensor]]


class Classifier(nn.Module):
    """encoder → head as one module returning logits (eval mode: dropout off)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(**batch))


def _logits(model: nn.Module, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**example)
    return out.logits if hasattr(out, "logits") else out


def diagonal_fisher(
    model: nn.Module,
    examples: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, torch.Tensor],
    label_mode: LabelMode = "expected",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Exact per-example diagonal Fisher of ``params`` under the model's own predictive distribution.

    Each example is a batch of one (``model(**example)`` → logits [1, C]). Returns the mean over examples of
    Σ_c p_c (∇ log p_c)² (``"expected"``) or (∇ log p_y)² with y ~ p (``"sampled"``), only for the parameters
    that received a gradient. Examples run on the model's device; the Fisher comes back on the CPU.
    """
    model.eval()
    device = module_device(model)
    names = list(params)
    tensors = [params[n] for n in names]
    fisher: list[torch.Tensor | None] = [None] * len(names)
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for example in examples:
        logits = _logits(model, to_device(example, device))
        if logits.shape[0] != 1:
            raise DataError(f"the exact Fisher needs one example per forward pass, got a batch of {logits.shape[0]}")
        log_probs = torch.log_softmax(logits[0].float(), dim=-1)
        probs = log_probs.detach().exp()
        if label_mode == "expected":
            terms = [(c, float(probs[c])) for c in range(len(probs))]
        else:
            terms = [(int(torch.multinomial(probs.cpu(), 1, generator=generator)), 1.0)]  # the CPU generator's draw
        for position, (c, weight) in enumerate(terms):
            grads = torch.autograd.grad(
                log_probs[c], tensors, retain_graph=position < len(terms) - 1, allow_unused=True
            )
            for index, grad in enumerate(grads):
                if grad is None:
                    continue
                square = grad.detach().float().pow(2).mul_(weight)
                fisher[index] = square if fisher[index] is None else fisher[index].add_(square)
        count += 1
    if count == 0:
        raise DataError("the Fisher needs at least one example; the task has no inputs")
    return {n: (f / count).cpu() for n, f in zip(names, fisher, strict=True) if f is not None}  # merged on the CPU


def batch_squared_fisher(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """FusionBench's estimator (not the diagonal Fisher): Σ_batches (∇ Σ_i Σ_c √p_ic·log p_ic)² / N, √p detached
    (batches run on the model's device; the result is on the CPU)."""
    model.eval()
    device = module_device(model)
    names = list(params)
    tensors = [params[n] for n in names]
    fisher: list[torch.Tensor | None] = [None] * len(names)
    count = 0
    for batch in batches:
        log_probs = torch.log_softmax(_logits(model, to_device(batch, device)).float(), dim=-1)
        objective = (log_probs.detach().exp().sqrt() * log_probs).sum()
        grads = torch.autograd.grad(objective, tensors, allow_unused=True)
        for index, grad in enumerate(grads):
            if grad is not None:
                square = grad.detach().float().pow(2)
                fisher[index] = square if fisher[index] is None else fisher[index].add_(square)
        count += log_probs.shape[0]
    if count == 0:
        raise DataError("the Fisher needs at least one example; the task has no inputs")
    return {n: (f / count).cpu() for n, f in zip(names, fisher, strict=True) if f is not None}  # merged on the CPU


def fisher_coefficients(fishers: Sequence[Mapping[str, torch.Tensor]], normalize: bool) -> list[float]:
    """c_t = 1/T, or c_t = (1/‖F_t‖₂) / Σ_s (1/‖F_s‖₂) with the L2 norm over all of F_t's entries (FusionBench
    ``normalize_fisher_weight``)."""
    if not normalize:
        return [1.0 / len(fishers)] * len(fishers)
    norms = [float(torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values()))) for fisher in fishers]
    inverse = [1.0 / max(n, 1e-30) for n in norms]
    return [v / sum(inverse) for v in inverse]


def fisher_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    normalize: bool = False,
    epsilon: float = EPSILON,
) -> State:
    """θ = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε) for every float tensor with a Fisher in every model; other
    float tensors stay at θ₀; integer buffers come from ``base``."""
    coefficients = fisher_coefficients(fishers, normalize)
    merged = {}
    for name, reference in base.items():
        if not reference.is_floating_point() or not all(name in f for f in fishers):
            continue
        numerator = torch.zeros(reference.shape, dtype=torch.float64)
        denominator = torch.zeros(reference.shape, dtype=torch.float64)
        for c, fisher, state in zip(coefficients, fishers, states, strict=True):
            weight = (fisher[name].double() + epsilon) * c
            numerator += weight * state[name].double()
            denominator += weight
        merged[name] = numerator / denominator
    return assemble(base, merged)


class FisherParams(MethodParams):
    num_examples: int = Field(
        256, ge=1, description="unlabelled train inputs per task for each Fisher (FusionBench 256)"
    )
    label_mode: LabelMode = Field("expected", description="Σ_c p_c g_c² (exact, C backward passes) or y ~ p (one pass)")
    normalize: bool = Field(True, description="weight each model by 1/‖F_t‖ (FusionBench default)")
    epsilon: float = Field(EPSILON, ge=0.0, description="ε added to every Fisher entry before weighting")


class FisherBatchParams(MethodParams):
    num_examples: int = Field(256, ge=1, description="unlabelled train inputs per task (FusionBench 256)")
    fisher_batch_size: int = Field(32, ge=1, description="examples per squared batch gradient (FusionBench 32)")
    normalize: bool = Field(True, description="weight each model by 1/‖F_t‖ (FusionBench default)")
    epsilon: float = Field(EPSILON, ge=0.0, description="ε added to every Fisher entry before weighting")


def _expert_fishers(
    experts: ExpertSet, num_examples: int, estimate: Estimator
) -> tuple[State, list[State], list[State]]:
    base = experts.base_encoder().model.state_dict()
    states = experts.expert_states()
    check_layouts(base, states, experts.tasks)
    fishers = []
    for index, expert in enumerate(experts.experts):
        texts = [expert.texts[i] for i in uniform_subset(len(expert.texts), num_examples, experts.seed + index).tolist()]
        if not texts:
            raise DataError(f"task '{expert.task}' has no inputs to estimate its Fisher from")
        with placed(Classifier(expert.model.encoder, expert.model.head), experts.device) as model:
            params = dict(expert.model.encoder.model.named_parameters())
            fishers.append(estimate(model, expert.model.encoder.tokenizer, texts, params, experts.seed + index))
    return base, states, fishers


class FisherMerging(DataMergeMethod):
    """Fisher-weighted average with the exact per-example diagonal Fisher (module doc)."""

    spec = MethodSpec(
        "fisher",
        "Fisher merging: exact per-example diagonal Fisher of each expert on its unlabelled train inputs",
        FisherParams,
        reads="train",
        runs="in_memory",
    )
    params: FisherParams

    def merge(self, experts: ExpertSet) -> State:
        p = self.params

        def estimate(
            model: nn.Module, tokenizer: Any, texts: list[str], params: dict[str, torch.Tensor], seed: int
        ) -> dict[str, torch.Tensor]:
            examples = tokenize(tokenizer, texts, experts.max_length, 1)
            return diagonal_fisher(model, examples, params, p.label_mode, seed)

        base, states, fishers = _expert_fishers(experts, p.num_examples, estimate)
        self.info = {"coefficients": fisher_coefficients(fishers, p.normalize)}
        return fisher_merge(states, fishers, base, p.normalize, p.epsilon)


class FisherBatchMerging(DataMergeMethod):
    """Fisher merging with FusionBench's batch-squared estimator (module doc: not the diagonal Fisher)."""

    spec = MethodSpec(
        "fisher_batch",
        "Fisher merging with FusionBench's batch-squared gradient estimator (not the true diagonal Fisher)",
        FisherBatchParams,
        reads="train",
        runs="in_memory",
    )
    params: FisherBatchParams

    def merge(self, experts: ExpertSet) -> State:
        p = self.params

        def estimate(
            model: nn.Module, tokenizer: Any, texts: list[str], params: dict[str, torch.Tensor], seed: int
        ) -> dict[str, torch.Tensor]:
            batches = tokenize(tokenizer, texts, experts.max_length, p.fisher_batch_size)
            return batch_squared_fisher(model, batches, params)

        base, states, fishers = _expert_fishers(experts, p.num_examples, estimate)
        self.info = {"coefficients": fisher_coefficients(fishers, p.normalize)}
        return fisher_merge(states, fishers, base, p.normalize, p.epsilon)


def fisher(
    base_path: str,
    expert_paths: Sequence[str],
    texts: Sequence[Sequence[str]],
    num_examples: int = 256,
    label_mode: LabelMode = "expected",
    normalize: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
) -> State:
    """Fisher merging of HF classifier folders, each Fisher from its own unlabelled ``texts`` (convenience wrapper)."""
    experts = expert_set_from_texts(base_path, expert_paths, texts, max_length=max_length, seed=seed)
    params = FisherParams(num_examples=num_examples, label_mode=label_mode, normalize=normalize)
    return FisherMerging(params, len(expert_paths)).merge(experts)
