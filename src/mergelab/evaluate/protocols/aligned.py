"""Aligned Eval (paper §4.1, Table 1, Eq. 6-7): map merged onto fine-tuned features, score the original head.

A transform G(z) = A z + b is fitted on the *unlabelled eval-split inputs* of the task (transductive, as in
the paper) to minimise the L1 distance ‖G(f_m(X)) − f_t(X)‖₁, then ŷ = argmax head(G(f_m(x))) on the same
split.

Families (option ``transform``), from weakest to strongest constraint:

============  ==========================  ==============================================================
family        constraint                  parameterisation and default initialisation
============  ==========================  ==============================================================
affine        none                        A, b free; init at the ridge (L2) solution
linear        b = 0                       A free; init at the ridge solution
invertible    det A ≠ 0, b = 0            A = P·L·U: P a fixed permutation, L unit lower-triangular, U
                                          upper-triangular with diagonal sign·exp(s); P, the signs and the
                                          init are the LU factors of the ridge solution, so det A =
                                          ±exp(Σ s) never reaches 0 (init "identity" fixes det A > 0)
euclidean     AᵀA = I, b free             penalty α‖AᵀA − I‖₁ (Eq. 7) plus a free bias; A random init
orthogonal    AᵀA = I, b = 0              penalty α‖AᵀA − I‖₁ (Eq. 7); A random init (as in the paper)
scaling       A diagonal, b = 0           diagonal s; init at the per-dimension L2 solution
procrustes    AᵀA = I exactly, L2 loss    closed form A = U Vᵀ from the SVD of Yᵀ X; ``center=True`` fits
                                          centred features and adds b = ȳ − A x̄ (the Euclidean L2 fit)
============  ==========================  ==============================================================

Objective of the iterative families: mean|G(X) − Y| / mean|Y| + α_s · ‖AᵀA − I‖₁ / d (penalty only for
euclidean and orthogonal; ‖·‖₁ is the entrywise L1 norm). The data term is divided by the constant mean|Y| and
the penalty by d, so α is free of the feature scale and dimension (Eq. 7 up to a rescaling of α). With this
scaling a uniform scale mismatch s < 1 between merged and fine-tuned features is resolved towards orthogonal A
whenever 2α > s, so α = 1 makes A converge to an orthogonal map (the paper's claim), while smaller α trades
orthogonality for fit. α_s ramps linearly from 0 to α over the first ``alpha_warmup`` = 0.5 of the steps
(penalty continuation: from a random init the data term first finds the rotation, then the penalty pulls A
onto the orthogonal group; without the ramp, 500 steps on a noisy rescaled toy at d = 384 ended with
max|AᵀA − I| = 0.6 and a 30 % worse L1 fit, against < 1e-4 with it).
Defaults: full-batch Adam (lr 1e-2, betas 0.9/0.999) with a cosine decay of the lr to 0; 500 steps for
euclidean/orthogonal (random init), 200 for the rest (they start at the L2 solution); α = 1. Shorter or
faster-decaying schedules from a random init (300 steps, or lr 2e-2) were measured to leave one direction of A
off the orthogonal group on noisy, rescaled toys. Measured on one CPU thread, N = 1000: d = 384 ≈ 11 ms per
step (≈ 5.5 s per orthogonal fit, ≈ 2 s for the 200-step families), d = 768 ≈ 27 s per orthogonal fit;
procrustes is closed-form (< 0.2 s). A fast non-paper setting for large d on CPU:
``init="ridge", steps=150`` (deviation < 1e-3 and the same L1 on our toys, ≈ 1.7 s at d = 384). "random"
init draws A with N(0, 1/d) entries from ``seed`` (the only use of the seed); "identity" and "ridge" are
deterministic. Extras report the L1 distance before/after, the final loss and, for every family, the
orthogonality deviation of A (max-abs and Frobenius norm of AᵀA − I) and log|det A|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergelab.errors import ConfigError
from mergelab.evaluate.fewshot import derive_seed
from mergelab.evaluate.protocols.common import (
    ProtocolContext,
    ProtocolOutcome,
    check_labels_fit,
    head_logits,
    outcome,
    paired_split,
    positive,
    reject_unknown_options,
    seeded,
)

TRANSFORMS = ("affine", "linear", "invertible", "euclidean", "orthogonal", "scaling", "procrustes")
INITS = ("random", "identity", "ridge")
# the penalised families start at random (paper); the others at the L2 solution, so they need fewer steps
DEFAULT_INIT = {"euclidean": "random", "orthogonal": "random"}  # others: "ridge"
DEFAULT_STEPS = {"euclidean": 500, "orthogonal": 500}  # others: 200
RIDGE = 1e-3  # ridge strength relative to trace(XᵀX)/d, so the L2 init exists even when N < d


@dataclass(frozen=True)
class FittedTransform:
    """G(z) = z Aᵀ + b (``bias`` None means b = 0)."""

    matrix: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        out = features @ self.matrix.T
        return out if self.bias is None else out + self.bias


def orthogonality_deviation(matrix: torch.Tensor) -> dict[str, float]:
    """Max-abs and Frobenius norm of AᵀA − I."""
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    gap = matrix.T @ matrix - eye
    return {"orth_dev_max": float(gap.abs().max()), "orth_dev_fro": float(torch.linalg.matrix_norm(gap))}


def procrustes(source: torch.Tensor, target: torch.Tensor, center: bool = False) -> FittedTransform:
    """Orthogonal A (and b when ``center``) minimising Σ‖A x_i + b − y_i‖² (closed form via SVD of Yᵀ X)."""
    x, y = source.double(), target.double()
    bias = None
    if center:
        x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
        x, y = x - x_mean, y - y_mean
    u, _, vh = torch.linalg.svd(y.T @ x)
    matrix = u @ vh
    if center:
        bias = (y_mean - x_mean @ matrix.T).to(source.dtype)
    return FittedTransform(matrix.to(source.dtype), bias)


def ridge_solution(source: torch.Tensor, target: torch.Tensor, with_bias: bool) -> FittedTransform:
    """L2 solution of Y ≈ X Aᵀ (+ b) with a small ridge (``RIDGE`` × mean eigenvalue of XᵀX)."""
    x, y = source.double(), target.double()
    if with_bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    gram = x.T @ x
    strength = RIDGE * float(torch.diagonal(gram).mean().clamp(min=1e-12))
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + strength * eye, x.T @ y)  # [d(+1), d] = Aᵀ (; b)
    if with_bias:
        return FittedTransform(solution[:-1].T.to(source.dtype), solution[-1].to(source.dtype))
    return FittedTransform(solution.T.to(source.dtype), None)


class _Transform(nn.Module):
    """Trainable G for one iterative family; ``matrix()`` is A under the family's parameterisation."""

    def __init__(self, family: str, init: FittedTransform, device: torch.device) -> None:
        super().__init__()
        self.family = family
        dim = init.matrix.shape[0]
        a0 = init.matrix.to(device=device, dtype=torch.float32)
        self.bias = (
            nn.Parameter(torch.zeros(dim, device=device)) if family in ("affine", "euclidean") else None
        )
        if self.bias is not None and init.bias is not None:
            self.bias.data.copy_(init.bias)
        if family == "scaling":
            self.scale = nn.Parameter(torch.diagonal(a0).clone())
        elif family == "invertible":
            perm, lower, upper = torch.linalg.lu(a0.double())
            diag = torch.diagonal(upper)
            floor = 1e-4 * float(diag.abs().max().clamp(min=1e-12))
            self.register_buffer("perm", perm.float())
            self.register_buffer("sign", torch.where(diag < 0, -1.0, 1.0).float())
            self.log_diag = nn.Parameter(diag.abs().clamp(min=floor).log().float())
            self.lower = nn.Parameter(torch.tril(lower, -1).float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
        else:
            self.weight = nn.Parameter(a0.clone())

    def matrix(self) -> torch.Tensor:
        if self.family == "scaling":
            return torch.diag(self.scale)
        if self.family == "invertible":
            eye = torch.eye(len(self.log_diag), device=self.log_diag.device)
            lower = torch.tril(self.lower, -1) + eye
            upper = torch.triu(self.upper, 1) + torch.diag(self.sign * self.log_diag.exp())
            return self.perm @ lower @ upper
        return self.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.family == "scaling":
            out = features * self.scale
        else:
            out = features @ self.matrix().T
        return out if self.bias is None else out + self.bias

    def frozen(self) -> FittedTransform:
        with torch.no_grad():
            bias = None if self.bias is None else self.bias.detach().clone()
            return FittedTransform(self.matrix().detach().clone(), bias)


def _initial(
    family: str, init: str, source: torch.Tensor, target: torch.Tensor, seed: int
) -> FittedTransform:
    dim = source.shape[1]
    if init == "identity":
        return FittedTransform(torch.eye(dim), None)
    if init == "random":
        generator = torch.Generator().manual_seed(derive_seed(seed, "aligned-init"))
        return FittedTransform(torch.randn(dim, dim, generator=generator) / math.sqrt(dim), None)
    if family == "scaling":
        x, y = source.double(), target.double()
        scale = (x * y).sum(dim=0) / (x * x).sum(dim=0).clamp(min=1e-12)
        return FittedTransform(torch.diag(scale).float(), None)
    return ridge_solution(source, target, with_bias=family in ("affine", "euclidean"))


def fit_transform(
    source: torch.Tensor,
    target: torch.Tensor,
    family: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    lr: float = 1e-2,
    alpha: float = 1.0,
    alpha_warmup: float = 0.5,
    init: str | None = None,
    center: bool = False,
) -> tuple[FittedTransform, dict[str, float]]:
    """Fit G of ``family`` mapping ``source`` [N, d] onto ``target`` [N, d]; returns G and fit diagnostics."""
    if family not in TRANSFORMS:
        raise ConfigError(f"unknown aligned transform '{family}'; choose one of: {', '.join(TRANSFORMS)}")
    if source.shape != target.shape:
        raise ConfigError(
            f"aligned transforms map between features of equal shape; got {tuple(source.shape)} and "
            f"{tuple(target.shape)} (merged and fine-tuned encoders must have the same feature size)"
        )
    source, target = source.float(), target.float()
    if family == "procrustes":
        return procrustes(source, target, center=center), {}
    init = init or DEFAULT_INIT.get(family, "ridge")
    steps = DEFAULT_STEPS.get(family, 200) if steps is None else steps
    if init not in INITS:
        raise ConfigError(f"unknown aligned init '{init}'; choose one of: {', '.join(INITS)}")
    positive("aligned", "steps", steps, integer=True)
    positive("aligned", "lr", lr)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ConfigError(f"protocol 'aligned': option 'alpha' must be a number >= 0, got {alpha!r}")
    if (
        isinstance(alpha_warmup, bool)
        or not isinstance(alpha_warmup, (int, float))
        or not 0 <= alpha_warmup <= 1
    ):
        raise ConfigError(
            f"protocol 'aligned': option 'alpha_warmup' must be in [0, 1], got {alpha_warmup!r}"
        )
    with seeded(derive_seed(seed, "aligned")), torch.enable_grad():
        model = _Transform(family, _initial(family, init, source.cpu(), target.cpu(), seed), source.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
        scale = target.abs().mean().clamp(min=1e-12)
        penalised = family in ("euclidean", "orthogonal")
        eye = torch.eye(source.shape[1], device=source.device)
        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = (model(source) - target).abs().mean() / scale
            if penalised and alpha > 0:
                matrix = model.matrix()
                ramp = min(1.0, (step + 1) / (alpha_warmup * steps)) if alpha_warmup > 0 else 1.0
                loss = loss + ramp * alpha * (matrix.T @ matrix - eye).abs().sum() / len(eye)
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.frozen(), {"final_loss": float(loss.detach())}


def aligned(
    ctx: ProtocolContext,
    *,
    seed: int = 0,
    shots: int = 0,
    transform: str = "orthogonal",
    steps: int | None = None,
    lr: float = 1e-2,
    alpha: float = 1.0,
    alpha_warmup: float = 0.5,
    init: str | None = None,
    center: bool = False,
    **options: Any,
) -> ProtocolOutcome:
    """Aligned Eval with ``transform`` fitted on the unlabelled eval split (transductive).

    Deterministic except for the seeded random init of euclidean/orthogonal; ``shots`` is ignored.
    """
    reject_unknown_options("aligned", options, aligned)
    finetuned = ctx.require_finetuned("aligned")
    merged_split, finetuned_split = paired_split(
        ctx.task, ctx.merged, finetuned, ctx.eval_split, "merged and fine-tuned"
    )
    source, target = merged_split.features, finetuned_split.features
    fitted, diagnostics = fit_transform(
        source,
        target,
        transform,
        seed=seed,
        steps=steps,
        lr=lr,
        alpha=alpha,
        alpha_warmup=alpha_warmup,
        init=init,
        center=center,
    )
    with torch.no_grad():
        mapped = fitted(source.float())
        extras: dict[str, Any] = {
            "transform": transform,
            "l1_before": float((source - target).abs().mean()),
            "l1_after": float((mapped - target).abs().mean()),
            **diagnostics,
            **orthogonality_deviation(fitted.matrix.double()),
            "log_abs_det": float(torch.linalg.slogdet(fitted.matrix.double()).logabsdet),
        }
    logits = head_logits(ctx.head, mapped)
    check_labels_fit(ctx.task, merged_split, logits.shape[1], ctx.eval_split)
    return outcome(logits, merged_split.labels, transductive=True, **extras)
