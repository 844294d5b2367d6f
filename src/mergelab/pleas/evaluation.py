"""Per-task evaluation of merged features when the label spaces differ (heads are refit, never merged).

* Linear probe: a linear head trained with labels (all, or ``shots`` per class) on the merged features.
* KL head refit (FT-Classifier style): a linear head trained WITHOUT labels to match the original model's
  head on the same inputs, i.e. min KL(softmax(teacher / T) ‖ softmax(head(f) / T)) over unlabelled inputs.

Both standardise features with training statistics and train full-batch with L-BFGS plus an L2 penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.pleas.common import iter_batches


def extract_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model.features(x)`` if the model has it (originals), else ``model(x)`` (merged, head = Identity)."""
    model.eval()
    fn = getattr(model, "features", model)
    with torch.no_grad():
        return torch.cat([fn(batch) for batch in iter_batches(inputs, batch_size)])


def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(batch) for batch in iter_batches(inputs, batch_size)])


@dataclass(frozen=True)
class LinearHead:
    """A linear head on standardised features."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias


def fit_linear_head(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    temperature: float = 1.0,
) -> LinearHead:
    """Fit a linear head by L-BFGS: cross-entropy to integer labels, or to soft targets given as teacher
    logits ([N, num_classes] float; KL up to a constant, both sides divided by ``temperature``)."""
    if len(features) == 0 or len(features) != len(targets):
        raise DataError(
            f"need as many targets as features (got {len(features)} features, {len(targets)} targets)"
        )
    if weight_decay < 0 or temperature <= 0:
        raise ConfigError("weight_decay must be >= 0 and temperature > 0")
    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    soft = targets.is_floating_point()
    if soft:
        target = F.softmax(targets.double() / temperature, dim=1)
    else:
        target = targets.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ weight.T + bias
        if soft:
            logits = logits / temperature
        loss = F.cross_entropy(logits, target) + weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(
        weight=weight.detach().float(), bias=bias.detach().float(), mean=mean.float(), std=std.float()
    )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(1) == labels).sum()) / len(labels)


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """``shots`` examples per class (seeded); raises ``DataError`` when a class has fewer."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        if len(idx) < shots:
            raise DataError(f"class {int(cls)} has {len(idx)} training examples, fewer than shots={shots}")
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:shots]])
    return torch.cat(picked).sort().values


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    shots: int | None = None,
    seed: int = 0,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a linear probe trained on (optionally ``shots``-per-class) labelled features."""
    if shots is not None:
        idx = few_shot_indices(train_labels, shots, seed)
        train_features, train_labels = train_features[idx], train_labels[idx]
    head = fit_linear_head(train_features, train_labels, num_classes, weight_decay)
    return accuracy(head(test_features), test_labels)


def kl_head_accuracy(
    train_features: torch.Tensor,
    teacher_logits: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    temperature: float = 1.0,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a head distilled (unlabelled) from the original model's logits on the train inputs."""
    head = fit_linear_head(
        train_features, teacher_logits, teacher_logits.shape[1], weight_decay, temperature=temperature
    )
    return accuracy(head(test_features), test_labels)
