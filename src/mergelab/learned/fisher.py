"""Fisher merging (Matena & Raffel, 2022) with an exact per-example diagonal Fisher.

F_t = E_x E_{y~p_θt(·|x)} [(∇_θ log p_θt(y|x))²], estimated per example (batch size 1) — never by squaring the gradient
of a batch-summed loss, which adds cross terms (what one public implementation does). ``label_mode="expected"`` sums
over classes weighted by p (exact expectation, C backward passes per example); ``"sampled"`` draws y ~ p (one
backward pass, unbiased). Merge: θ = Σ_t c_t F̂_t θ_t / Σ_t c_t F̂_t with F̂ = F + ε (ε = 1e-6 as FusionBench) and
c_t = 1/T, or ∝ 1/‖F_t‖ with ``normalize`` (FusionBench's default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

EPSILON = 1e-6


def _logits(model: nn.Module, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**example)
    return (out.logits if hasattr(out, "logits") else out)[0]


def diagonal_fisher(model: nn.Module, examples: Iterable[Mapping[str, torch.Tensor]],
                    params: Mapping[str, nn.Parameter], label_mode: Literal["expected", "sampled"] = "expected",
                    seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-example diagonal Fisher of ``params`` under the model's own predictive distribution."""
    model.eval()
    names = list(params)
    tensors = [params[n] for n in names]
    fisher = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for example in examples:
        log_probs = torch.log_softmax(_logits(model, example).float(), dim=-1)
        probs = log_probs.exp().detach()
        classes = range(len(probs)) if label_mode == "expected" else [int(torch.multinomial(probs, 1, generator=generator))]
        for c in classes:
            grads = torch.autograd.grad(log_probs[c], tensors, retain_graph=True, allow_unused=True)
            weight = float(probs[c]) if label_mode == "expected" else 1.0
            for acc, grad in zip(fisher, grads, strict=True):
                if grad is not None:
                    acc.add_(grad.detach().float().pow(2), alpha=weight)
        count += 1
    return {n: f / max(count, 1) for n, f in zip(names, fisher, strict=True)}


def fisher_merge(states: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                 base: Mapping[str, torch.Tensor], normalize: bool = False,
                 epsilon: float = EPSILON) -> dict[str, torch.Tensor]:  # fmt: skip
    """Fisher-weighted average of every float tensor with a Fisher; others averaged; integer buffers from ``base``."""
    coefficients = [1.0 / len(states)] * len(states)
    if normalize:
        norms = [float(torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values()))) for fisher in fishers]
        inverse = [1.0 / max(n, 1e-30) for n in norms]
        coefficients = [v / sum(inverse) for v in inverse]
    merged = {}
    for name, reference in base.items():
        if not reference.is_floating_point():
            merged[name] = reference.clone()
            continue
        tensors = [s[name].float() for s in states]
        if all(name in f for f in fishers):
            weights = [c * (f[name].float() + epsilon) for c, f in zip(coefficients, fishers, strict=True)]
            merged[name] = (sum(w * t for w, t in zip(weights, tensors, strict=True)) / sum(weights)).to(reference.dtype)
        else:
            merged[name] = torch.stack(tensors).mean(0).to(reference.dtype)
    return merged


def fisher(base_path: str, expert_paths: Sequence[str], texts: Sequence[Sequence[str]], num_examples: int = 64,
           label_mode: Literal["expected", "sampled"] = "expected", normalize: bool = True, max_length: int = 64,
           seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Fisher merging of HF classifiers' encoders; each Fisher from the expert's own unlabelled train texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mergelab.models.hf import load_encoder

    base_state = load_encoder(base_path, base_path).model.state_dict()
    states, fishers = [], []
    for path, task_texts in zip(expert_paths, texts, strict=True):
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = getattr(model, model.base_model_prefix)
        params = dict(encoder.named_parameters())
        examples = (tokenizer([t], truncation=True, max_length=max_length, return_tensors="pt")
                    for t in list(task_texts)[:num_examples])  # fmt: skip
        fishers.append(diagonal_fisher(model, examples, params, label_mode, seed))
        states.append(encoder.state_dict())
    return fisher_merge(states, fishers, base_state, normalize=normalize)
