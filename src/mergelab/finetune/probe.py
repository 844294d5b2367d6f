"""The frozen-encoder linear probe: multinomial logistic regression on fixed features, as a torch ``nn.Linear``.

It is the bar an expert must clear (an expert below its probe is under-trained, so no upper bound) and the head's
warm start in the LP-FT recipe. The L2 strength C is chosen by stratified k-fold cross-validation on the train
features only (scikit-learn's ``LogisticRegression``, L-BFGS; ties go to the stronger regularisation), then
refit on all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergelab.core.errors import DataError

PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
MISSING_CLASS_MARGIN = 10.0  # logit gap below every seen class for a class absent from the train split


def linear_from_logistic(coef: np.ndarray, intercept: np.ndarray, classes: Sequence[int], num_classes: int) -> nn.Linear:
    """An ``nn.Linear(d, num_classes)`` with the same argmax and softmax as a fitted logistic regression.

    A binary model (one row of coefficients) becomes the two rows ∓w/2, ∓b/2; a class the fit never saw gets
    zero weights and a bias ``MISSING_CLASS_MARGIN`` below the smallest seen bias.
    """
    coef, intercept = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
    if coef.shape[0] == 1 and len(classes) == 2:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, float(intercept.min()) - MISSING_CLASS_MARGIN)
    for row, label in enumerate(classes):
        weight[int(label)], bias[int(label)] = coef[row], intercept[row]
    head = nn.Linear(coef.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    return head.eval()


def fit_linear_probe(features: torch.Tensor, labels: Sequence[int], num_classes: int, *, seed: int,
                     cs: Sequence[float] = PROBE_CS, folds: int = 3) -> tuple[nn.Linear, dict[str, Any]]:  # fmt: skip
    """The cross-validated logistic-regression probe on ``features`` [N, d] as a head, and what was chosen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = features.detach().cpu().double().numpy()  # deliberate: scikit-learn fits on the CPU
    y = np.asarray([int(v) for v in labels])
    if len(x) != len(y) or len(y) == 0:
        raise DataError(f"the probe needs one label per feature row, got {len(x)} rows and {len(y)} labels")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"the probe needs at least 2 classes in the train split, got {classes.tolist()}")
    k = int(min(folds, counts.min()))
    scores: dict[float, float] = {}
    if k >= 2:  # a class with a single example allows no stratified folds: the default strength
        split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % (1 << 32))
        for c in cs:
            model = LogisticRegression(C=c, max_iter=3000)
            scores[float(c)] = float(cross_val_score(model, x, y, cv=split, scoring="accuracy").mean())
    chosen = max(scores, key=lambda c: (scores[c], -c)) if scores else 1.0  # ties: the stronger regularisation
    model = LogisticRegression(C=chosen, max_iter=3000).fit(x, y)
    head = linear_from_logistic(model.coef_, model.intercept_, model.classes_.tolist(), num_classes)
    with torch.no_grad():
        predicted = head(features.float()).argmax(1).numpy()
    train_accuracy = int((predicted == y).sum()) / len(y)
    return head, {"C": chosen, "folds": k, "cv_accuracy": scores, "train_accuracy": train_accuracy,
                  "examples": len(y)}  # fmt: skip
