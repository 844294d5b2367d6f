"""Aligned Eval (paper §4.1, Table 1, Eq. 6-7): map merged onto fine-tuned features, score the original head.

A transform G(z) = A z + b is fitted on the *unlabelled eval-split inputs* of the task (transductive, as in
the paper) to minimise the L1 distance ‖G(f_m(X)) − f_t(X)‖₁, then ŷ = argmax head(G(f_m(x))).

Fitting and scoring (option ``fit``)
------------------------------------
``fit="cross"`` (default) cross-fits: the eval items are split into two halves by a permutation seeded from
``seed`` (``derive_seed(seed, "aligned-halves")``, sizes ⌊N/2⌋ and ⌈N/2⌉); G is fitted on one half and the head
scores G(merged features) of the *other* half, both ways. Every eval item is scored exactly once, by the map
that did not see it, and the accuracy is correct / N over all eval items. ``fit="in_sample"`` is the paper's
procedure (fit and score on the same N items). It measures capacity as much as alignment: at N = 600, d = 384
an affine map (≈148k parameters) fitted to merged features replaced by pure noise scores ≈ 98 % in-sample and
chance held-out; it is kept as an option and labelled in-sample everywhere (extras, stored names, report).

Noise control (option ``control``)
----------------------------------
``control="shuffled"`` runs the same procedure with the merged rows permuted against the fine-tuned rows and the
labels (one seeded permutation of the eval split, ``derive_seed(seed, "aligned-control")``): item i's fine-tuned
features and label are paired with the merged features of another item, so the merged side carries no
information about item i, and the map is fitted and scored exactly as for the real pairs. Cross-fitted, it must
score chance; in-sample, what it scores above chance is the family's capacity to memorise the fitted pairs.
Extras carry three chance rates: ``chance_independent`` = Σ_c p_c q_c, the accuracy expected of predictions
independent of the labels with this outcome's own predicted-class frequencies q (the mean of a permutation test,
the report's "chance" for controls), ``chance_majority`` (the majority-class rate, the largest that can be) and
``chance_uniform`` (1/C).

Families (option ``transform``), from weakest to strongest constraint:

============  ==========================  ==============================================================
family        constraint                  parameterisation
============  ==========================  ==============================================================
affine        none                        A, b free
linear        b = 0                       A free
invertible    det A ≠ 0, b = 0            A free but invertible (see the solvers)
euclidean     AᵀA = I, b free             A orthogonal, free bias
orthogonal    AᵀA = I, b = 0              A orthogonal
scaling       A diagonal, b = 0           diagonal s
procrustes    AᵀA = I exactly, L2 loss    closed form A = U Vᵀ from the SVD of Yᵀ X; ``center=True`` fits
                                          centred features and adds b = ȳ − A x̄ (the Euclidean L2 fit)
============  ==========================  ==============================================================

Objective of the L1 families: mean|G(X) − Y| / mean|Y| + α · ‖AᵀA − I‖₁ / d (penalty only for euclidean and
orthogonal; ‖·‖₁ is the entrywise L1 norm; the data term is divided by the constant mean|Y| and the penalty by
d, so α is free of the feature scale and dimension: Eq. 7 up to a rescaling of α). ``final_loss`` in the extras
is this objective (α = 1 unless set) evaluated on the returned map, for every solver, so solvers compare.

Solvers (option ``solver``)
---------------------------
``solver="fast"`` (default) solves the same problems with fewer, better steps:

* affine, linear: least absolute deviations, solved by ADMM on z = XAᵀ(+b) − Y with the least-squares
  operator (XᵀX + εI)⁻¹Xᵀ factorised once (ε = 1e-6 × mean eigenvalue), over-relaxation 1.6, ρ = 1/mean|r₀|;
  up to ``steps`` (default 100) iterations, stopping early when the best objective improved by < 1e-4
  (relative) over 10 iterations; the best iterate is returned. When N ≤ d (+1) the least-squares solution
  already interpolates (objective < 1e-6) and is returned as is (the minimum-norm interpolant).
* invertible: det A ≠ 0 is an open constraint, so it cannot bind: the linear L1 solution, when invertible in
  float32 (σ_min > 1.2e-7 σ_max, the float32 machine epsilon), is also the invertible optimum. When it is
  singular (N < d: A vanishes off the span of the fitted inputs) it is completed to A + σ_r (I − P), P the
  projector onto that span and σ_r the smallest singular value of A on it: G is unchanged on every fitted input
  (same loss, so still optimal) and invertible. If that too fails, the Adam solver's P·L·U parameterisation
  runs. Extras say which (``invertible_by``: linear, completed or adam). So the invertible family scores as the
  linear one whenever the linear optimum is invertible; the Adam solver's gap between them was its own
  optimisation error (its invertible fits ended at a higher L1 objective).
* euclidean, orthogonal: A stays exactly orthogonal (the constraint the penalty imposes in the limit; with α = 1
  the penalised Adam fit ends within 1e-4 of it). Riemannian full-batch Adam (lr 1e-2, cosine decay) on the L1
  data term from the Procrustes solution (centred for euclidean): the gradient G is projected onto the tangent
  space, G − A·sym(AᵀG), and each step is followed by one Newton–Schulz step A ← A(3I − AᵀA)/2 back onto the
  group (a polar decomposition if A ever strays by > 0.5); 40 steps. Without the tangent projection Adam's
  per-coordinate scaling turns the normal part of G into drift along the group and the L1 objective rises above
  the Procrustes start on small problems. On 600×384 features (C = 20) it reaches a lower L1 objective than 500
  penalised steps from a random init in about a tenth of the time (``benchmarks/aligned_speed.py``).
  ``init``: "procrustes" (default), "identity" or "random" (a seeded random orthogonal matrix). ``alpha`` does
  not apply (the penalty is 0).
* scaling: exact. min_s Σ_i |s x_i − y_i| per dimension is a weighted median of y_i / x_i with weights |x_i|.
* procrustes: closed form (both solvers).

``solver="adam"`` is the previous reference schedule (kept to reproduce older runs and to compare): full-batch
Adam (lr 1e-2, betas 0.9/0.999, cosine decay to 0) on the objective above; 500 steps for euclidean/orthogonal
from a random init with N(0, 1/d) entries (the paper) and α ramped linearly from 0 to α over the first
``alpha_warmup`` = 0.5 of the steps; 200 steps for the others from the ridge (L2) solution (``RIDGE`` = 1e-3);
invertible as A = P·L·U (P a fixed permutation, L unit lower-triangular, U upper-triangular with diagonal
sign·exp(s), initialised at the LU factors of the ridge solution, so det A = ±exp(Σ s) never reaches 0).

Extras report the fit mode, control, solver, per-half accuracies, each fit's objective, the L1 distance before
and after (held-out in cross mode), and for every fitted A the orthogonality deviation (max-abs and Frobenius
norm of AᵀA − I; the worst fit in the top-level keys) and log|det A|.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.core.rng import derive_seed
from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    check_labels_fit,
    head_logits,
    outcome,
    paired_split,
    seeded,
)

TRANSFORMS = ("affine", "linear", "invertible", "euclidean", "orthogonal", "scaling", "procrustes")
FITS = ("cross", "in_sample")
CONTROLS = ("none", "shuffled")
SOLVERS = ("fast", "adam")
INITS = ("random", "identity", "ridge", "procrustes")
ORTHOGONAL_INITS = ("procrustes", "identity", "random")  # the fast solver keeps A on the orthogonal group
PENALISED = ("euclidean", "orthogonal")
BIASED = ("affine", "euclidean")
# Adam solver: the penalised families start at random (paper); the others at the L2 solution (fewer steps)
DEFAULT_INIT = {"euclidean": "random", "orthogonal": "random"}  # others: "ridge"
DEFAULT_STEPS = {"euclidean": 500, "orthogonal": 500}  # others: 200
# fast solver: ADMM iterations (affine, linear, invertible) or Adam steps on the orthogonal group
FAST_STEPS = {"affine": 100, "linear": 100, "invertible": 100, "euclidean": 40, "orthogonal": 40}
RIDGE = 1e-3  # Adam solver's init: ridge strength relative to trace(XᵀX)/d, so the L2 init exists when N < d
LAD_RIDGE = 1e-6  # ADMM's least-squares operator: a tiny ridge, only for numerical safety
LAD_RELAX = 1.6  # ADMM over-relaxation
LAD_TOL, LAD_WINDOW = 1e-4, 10  # stop when the best objective improved by < LAD_TOL (relative) in LAD_WINDOW
INTERPOLATES = 1e-6  # an objective this small means the least-squares solution interpolates the fitted pairs
INVERTIBLE_RCOND = float(torch.finfo(torch.float32).eps)  # σ_min / σ_max above: invertible in float32
DEFAULT_ALPHA, DEFAULT_ALPHA_WARMUP = 1.0, 0.5


class AlignedOptions(ProtocolOptions):
    """The family, how it is fitted and scored, and its solver (module doc)."""

    protocol: ClassVar[str] = "aligned"
    transform: Literal[TRANSFORMS] = Field("orthogonal", description="family of G (module doc)")  # type: ignore[valid-type]
    steps: int | None = Field(None, gt=0, description="solver iterations (null: the family's and solver's default)")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate (solver adam; fast euclidean/orthogonal)")
    alpha: float | None = Field(None, ge=0, description="orthogonality penalty weight (solver adam; null: 1)")
    alpha_warmup: float | None = Field(
        None, ge=0, le=1, description="fraction of the steps ramping alpha up from 0 (solver adam; null: 0.5)"
    )
    init: Literal[INITS] | None = Field(None, description="start of the fit (null: the family's default)")  # type: ignore[valid-type]
    center: bool = Field(False, description="procrustes: fit centred features and add b = ȳ − A x̄")
    fit: Literal[FITS] = Field("cross", description="cross-fitted halves, or fit and score on the same items")  # type: ignore[valid-type]
    control: Literal[CONTROLS] = Field("none", description="shuffled: the noise control (rows permuted)")  # type: ignore[valid-type]
    solver: Literal[SOLVERS] = Field("fast", description="fast solvers, or the Adam reference schedule")  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _meaningful_for_the_solver(self) -> AlignedOptions:
        problem = solver_mismatch(self.transform, self.solver, self.alpha, self.alpha_warmup, self.init)
        if problem:
            raise ValueError(problem)
        return self


def solver_mismatch(family: str, solver: str, alpha: float | None, alpha_warmup: float | None,
                    init: str | None) -> str | None:  # fmt: skip
    """Why options set for the Adam solver do not apply to the fast solver of ``family`` (None: they do)."""
    if solver != "fast" or family == "procrustes":
        return None
    if alpha is not None or alpha_warmup is not None:
        return ("options 'alpha'/'alpha_warmup' set the penalty of solver='adam'; the fast solver keeps A exactly "
                "orthogonal (no penalty), so set solver: adam to use them")  # fmt: skip
    if init is not None and family not in PENALISED:
        return (f"option 'init' applies to solver='adam' (and to euclidean/orthogonal under the fast solver); the "
                f"fast {family} solver has no initialisation")  # fmt: skip
    if init is not None and init not in ORTHOGONAL_INITS:
        return (f"the fast {family} solver starts on the orthogonal group; init must be one of "
                f"{', '.join(ORTHOGONAL_INITS)}, got {init!r}")  # fmt: skip
    return None


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


def objective(
    fitted: FittedTransform, source: torch.Tensor, target: torch.Tensor, family: str, alpha: float
) -> tuple[float, float]:
    """(objective, L1 data term) of ``fitted`` on the pairs: mean|G(X) − Y| / mean|Y| (+ α‖AᵀA − I‖₁ / d)."""
    with torch.no_grad():
        data = float((fitted(source.float()) - target.float()).abs().mean() / target.abs().mean().clamp(min=1e-12))
        total = data
        if family in PENALISED and alpha > 0:
            a = fitted.matrix.double()
            eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
            total += alpha * float((a.T @ a - eye).abs().sum()) / a.shape[1]
    return total, data


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


# ------------------------------------------------------------------------------------------------------------
# fast solvers


def lad_admm(
    source: torch.Tensor, target: torch.Tensor, with_bias: bool, iterations: int
) -> tuple[FittedTransform, int]:
    """Least absolute deviations Y ≈ X Aᵀ (+ b) by over-relaxed ADMM; (best iterate, iterations run)."""
    x64 = source.double()
    if with_bias:
        x64 = torch.cat([x64, torch.ones(len(x64), 1, dtype=x64.dtype, device=x64.device)], dim=1)
    gram = x64.T @ x64
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    strength = LAD_RIDGE * float(torch.diagonal(gram).mean().clamp(min=1e-12))
    solve = torch.linalg.solve(gram + strength * eye, x64.T).float()  # [d(+1), N]: least-squares operator
    x, y = x64.float(), target.float()
    scale = float(y.abs().mean().clamp(min=1e-12))
    solution = solve @ y
    fitted = x @ solution
    residual = fitted - y
    best_loss, best = float(residual.abs().mean()) / scale, solution
    history = [best_loss]
    done = 0
    if best_loss > INTERPOLATES:
        rho = 1.0 / float(residual.abs().mean())
        z, u = residual.clone(), torch.zeros_like(residual)
        while done < iterations:
            done += 1
            solution = solve @ (y + z - u)
            fitted = x @ solution
            relaxed = LAD_RELAX * fitted + (1 - LAD_RELAX) * (z + y)
            v = relaxed - y + u
            z = torch.sign(v) * (v.abs() - 1.0 / rho).clamp(min=0)
            u = v - z
            loss = float((fitted - y).abs().mean()) / scale
            if loss < best_loss:
                best_loss, best = loss, solution
            history.append(best_loss)
            if len(history) > LAD_WINDOW and history[-LAD_WINDOW - 1] - best_loss < LAD_TOL * best_loss:
                break
    dtype = source.dtype
    if with_bias:
        return FittedTransform(best[:-1].T.contiguous().to(dtype), best[-1].to(dtype)), done
    return FittedTransform(best.T.contiguous().to(dtype), None), done


def weighted_median_scaling(source: torch.Tensor, target: torch.Tensor) -> FittedTransform:
    """Exact L1 scaling: per dimension, s = argmin Σ_i |s x_i − y_i| = weighted median of y_i/x_i, weights |x_i|."""
    x, y = source.double(), target.double()
    weights = x.abs()
    ratios = torch.where(weights > 0, y / torch.where(weights > 0, x, torch.ones_like(x)), torch.zeros_like(x))
    ordered, order = torch.sort(ratios, dim=0)
    cumulative = torch.gather(weights, 0, order).cumsum(dim=0)
    total = cumulative[-1]
    first = (cumulative >= 0.5 * total).double().argmax(dim=0)  # first index reaching half the weight
    scale = torch.gather(ordered, 0, first[None]).squeeze(0)
    scale = torch.where(total > 0, scale, torch.zeros_like(scale))
    return FittedTransform(torch.diag(scale).to(source.dtype), None)


def complete_invertible(linear: FittedTransform, source: torch.Tensor) -> tuple[FittedTransform | None, str]:
    """``linear`` if invertible, else A + σ_r(I − P) (P: projector onto the span of the fitted inputs, on which G
    is unchanged), or None when neither is invertible. Returns (map, how)."""
    a = linear.matrix.double()
    singular = torch.linalg.svdvals(a)
    if float(singular[-1]) > INVERTIBLE_RCOND * float(singular[0]):
        return linear, "linear"
    _, sx, vh = torch.linalg.svd(source.double(), full_matrices=False)
    rank = int((sx > INVERTIBLE_RCOND * sx[0]).sum()) if len(sx) else 0
    if rank == 0 or rank >= a.shape[1] or float(singular[0]) == 0.0:
        return None, "adam"
    basis = vh[:rank].T  # [d, r], orthonormal basis of the fitted inputs' span
    complement = torch.eye(a.shape[1], dtype=a.dtype, device=a.device) - basis @ basis.T
    on_span = torch.linalg.svdvals(a @ basis)
    floor = float(on_span[-1])
    if floor <= INVERTIBLE_RCOND * float(singular[0]):
        return None, "adam"
    completed = a + floor * complement
    check = torch.linalg.svdvals(completed)
    if float(check[-1]) <= INVERTIBLE_RCOND * float(check[0]):
        return None, "adam"
    return FittedTransform(completed.to(linear.matrix.dtype), None), "completed"


def _retract(matrix: torch.Tensor) -> torch.Tensor:
    """Back onto the orthogonal group: one Newton–Schulz step, or the polar factor when far from it."""
    gram = matrix.T @ matrix
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    if float((gram - eye).abs().max()) > 0.5:
        u, _, vh = torch.linalg.svd(matrix.double())
        return (u @ vh).to(matrix.dtype)
    return matrix @ (1.5 * eye - 0.5 * gram)


def orthogonal_adam(
    source: torch.Tensor,
    target: torch.Tensor,
    with_bias: bool,
    *,
    steps: int,
    lr: float,
    init: str,
    seed: int,
) -> FittedTransform:
    """min mean|X Aᵀ (+ b) − Y| over orthogonal A: full-batch Adam (cosine lr) on the tangent part of the L1 data
    term's gradient, each step retracted onto the orthogonal group; gradients in closed form (no autograd)."""
    x, y = source.float(), target.float()
    dim = x.shape[1]
    if init == "procrustes":
        start = procrustes(x, y, center=with_bias)
        matrix, bias = start.matrix.clone(), start.bias
    elif init == "identity":
        matrix, bias = torch.eye(dim, device=x.device), None
    else:  # random: a seeded random orthogonal matrix
        generator = torch.Generator().manual_seed(derive_seed(seed, "aligned-init"))
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        matrix, bias = (q * torch.sign(torch.diagonal(r))).float().to(x.device), None
    matrix = nn.Parameter(matrix)
    params = [matrix]
    offset = None
    if with_bias:
        offset = nn.Parameter(bias.clone() if bias is not None else torch.zeros(dim, device=x.device))
        params.append(offset)
    optimiser = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    denominator = float(y.abs().mean().clamp(min=1e-12)) * x.shape[0] * dim
    with torch.no_grad():
        for _ in range(steps):
            out = x @ matrix.T
            if offset is not None:
                out += offset
            sign = torch.sign(out.sub_(y))  # d mean|r| / dA = sign(r)ᵀ X / (N d)
            grad = (sign.T @ x).div_(denominator)
            inner = matrix.T @ grad  # Riemannian gradient: the tangent part G − A sym(AᵀG)
            matrix.grad = grad.sub_(matrix @ (inner + inner.T).mul_(0.5))
            if offset is not None:
                offset.grad = sign.sum(dim=0).div_(denominator)
            optimiser.step()
            schedule.step()
            matrix.copy_(_retract(matrix))
        for _ in range(2):  # polish: Newton–Schulz converges quadratically near the group
            matrix.copy_(_retract(matrix))
    return FittedTransform(matrix.detach().clone(), None if offset is None else offset.detach().clone())


# ------------------------------------------------------------------------------------------------------------
# Adam (reference) solver


class _Transform(nn.Module):
    """Trainable G for one iterative family; ``matrix()`` is A under the family's parameterisation."""

    def __init__(self, family: str, init: FittedTransform, device: torch.device) -> None:
        super().__init__()
        self.family = family
        dim = init.matrix.shape[0]
        a0 = init.matrix.to(device=device, dtype=torch.float32)
        self.bias = nn.Parameter(torch.zeros(dim, device=device)) if family in BIASED else None
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


def _initial(family: str, init: str, source: torch.Tensor, target: torch.Tensor, seed: int) -> FittedTransform:
    dim = source.shape[1]
    if init == "identity":
        return FittedTransform(torch.eye(dim), None)
    if init == "random":
        generator = torch.Generator().manual_seed(derive_seed(seed, "aligned-init"))
        return FittedTransform(torch.randn(dim, dim, generator=generator) / math.sqrt(dim), None)
    if init == "procrustes":
        return procrustes(source, target, center=family in BIASED)
    if family == "scaling":
        x, y = source.double(), target.double()
        scale = (x * y).sum(dim=0) / (x * x).sum(dim=0).clamp(min=1e-12)
        return FittedTransform(torch.diag(scale).float(), None)
    return ridge_solution(source, target, with_bias=family in BIASED)


def _adam_fit(
    source: torch.Tensor,
    target: torch.Tensor,
    family: str,
    *,
    seed: int,
    steps: int,
    lr: float,
    alpha: float,
    alpha_warmup: float,
    init: str,
) -> FittedTransform:
    with seeded(derive_seed(seed, "aligned")), torch.enable_grad():
        model = _Transform(family, _initial(family, init, source.cpu(), target.cpu(), seed), source.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
        scale = target.abs().mean().clamp(min=1e-12)
        penalised = family in PENALISED
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
    return model.frozen()


# ------------------------------------------------------------------------------------------------------------
# one fit


def check_shapes(source: torch.Tensor, target: torch.Tensor) -> None:
    """An aligned map goes between features of one shape."""
    if source.shape != target.shape:
        raise ConfigError(
            f"aligned transforms map between features of equal shape; got {tuple(source.shape)} and "
            f"{tuple(target.shape)} (merged and fine-tuned encoders must have the same feature size)"
        )


def _solve(source: torch.Tensor, target: torch.Tensor, info: dict[str, Any], opts: AlignedOptions, *, seed: int,
           alpha: float) -> FittedTransform:  # fmt: skip
    """The map of ``opts.transform`` fitted by ``opts.solver``; solver facts go into ``info``."""
    family, solver, steps, lr, init = opts.transform, opts.solver, opts.steps, opts.lr, opts.init
    alpha_warmup = opts.alpha_warmup
    if family == "procrustes":
        fitted = procrustes(source, target, center=opts.center)
    elif solver == "adam":
        fitted = _adam_fit(
            source,
            target,
            family,
            seed=seed,
            steps=DEFAULT_STEPS.get(family, 200) if steps is None else steps,
            lr=lr,
            alpha=alpha,
            alpha_warmup=DEFAULT_ALPHA_WARMUP if alpha_warmup is None else float(alpha_warmup),
            init=init or DEFAULT_INIT.get(family, "ridge"),
        )
    elif family == "scaling":
        fitted = weighted_median_scaling(source, target)
    elif family in PENALISED:
        fitted = orthogonal_adam(
            source,
            target,
            family == "euclidean",
            steps=FAST_STEPS[family] if steps is None else steps,
            lr=lr,
            init=init or "procrustes",
            seed=seed,
        )
    else:  # affine, linear, invertible
        iterations = FAST_STEPS[family] if steps is None else steps
        fitted, info["iterations"] = lad_admm(source, target, family == "affine", iterations)
        if family == "invertible":
            completed, info["invertible_by"] = complete_invertible(fitted, source)
            if completed is None:
                fitted = _adam_fit(
                    source, target, family, seed=seed, steps=DEFAULT_STEPS.get(family, 200), lr=lr,
                    alpha=alpha, alpha_warmup=DEFAULT_ALPHA_WARMUP, init="ridge",
                )  # fmt: skip
            else:
                fitted = completed
    return fitted


def fit_transform(
    source: torch.Tensor, target: torch.Tensor, family: str, *, seed: int = 0, **settings: Any
) -> tuple[FittedTransform, dict[str, Any]]:
    """Fit G of ``family`` mapping ``source`` [N, d] onto ``target`` [N, d] with the fit ``settings`` (options of
    ``AlignedOptions``: solver, steps, lr, alpha, alpha_warmup, init, center); returns G and fit diagnostics
    (``final_loss``: the objective on these pairs; ``fit_l1``: its L1 data term; solver facts)."""
    return fit_with(source, target, AlignedOptions.parse({**settings, "transform": family}), seed)


def fit_with(
    source: torch.Tensor, target: torch.Tensor, opts: AlignedOptions, seed: int
) -> tuple[FittedTransform, dict[str, Any]]:
    """``fit_transform`` with validated options."""
    check_shapes(source, target)
    alpha_value = DEFAULT_ALPHA if opts.alpha is None else float(opts.alpha)
    source, target = source.float(), target.float()
    info: dict[str, Any] = {"solver": opts.solver}
    fitted = _solve(source, target, info, opts, seed=seed, alpha=alpha_value)
    info["final_loss"], info["fit_l1"] = objective(fitted, source, target, opts.transform, alpha_value)
    return fitted, info


# ------------------------------------------------------------------------------------------------------------
# the protocol


def halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets (ascending) covering range(n), sizes n//2 and n − n//2, from a seeded permutation."""
    if n < 2:
        raise DataError(f"aligned cross-fitting needs at least 2 eval items, got {n}; use fit: in_sample")
    generator = torch.Generator().manual_seed(derive_seed(seed, "aligned-halves"))
    order = torch.randperm(n, generator=generator)
    return order[: n // 2].sort().values, order[n // 2 :].sort().values


def shuffled_rows(n: int, seed: int, purpose: str) -> torch.Tensor:
    """A seeded permutation of range(n) (the control's pairing of merged rows with fine-tuned rows)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, purpose))
    return torch.randperm(n, generator=generator)


def _fit_facts(fitted: FittedTransform, info: dict[str, Any]) -> dict[str, Any]:
    matrix = fitted.matrix.double()
    return {
        **info,
        **orthogonality_deviation(matrix),
        "log_abs_det": float(torch.linalg.slogdet(matrix).logabsdet),
    }


def fit_and_map(source: torch.Tensor, target: torch.Tensor, opts: AlignedOptions,
                seed: int) -> tuple[torch.Tensor, list[dict[str, Any]], list[torch.Tensor] | None]:  # fmt: skip
    """Every item's source row mapped by a fitted G: cross-fitted (each half by the map fitted on the other half)
    or in-sample (all items by the map fitted on them all); with each fit's facts and the halves (None in-sample)."""
    n = len(source)

    def one_fit(index: torch.Tensor) -> tuple[FittedTransform, dict[str, Any]]:
        fitted, info = fit_with(source[index], target[index], opts, seed)
        return fitted, _fit_facts(fitted, info)

    fits: list[dict[str, Any]] = []
    if opts.fit != "cross":
        fitted, facts = one_fit(torch.arange(n))  # in-sample: score the very pairs it was fitted on
        with torch.no_grad():
            mapped = fitted(source)
        fits.append({"fit_on": "all", "n_fit": n, **facts})
        return mapped, fits, None
    mapped = torch.empty_like(target)
    parts = list(halves(n, seed))
    for h, (fit_on, score_on) in enumerate(((parts[0], parts[1]), (parts[1], parts[0]))):
        fitted, facts = one_fit(fit_on)
        with torch.no_grad():
            mapped[score_on] = fitted(source[score_on])
        fits.append({"fit_on": f"half {h}", "n_fit": len(fit_on), **facts})
    return mapped, fits, parts


def score_facts(correct: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, classes: int,
                parts: list[torch.Tensor] | None) -> dict[str, Any]:  # fmt: skip
    """Items scored, per-half accuracy (half h scored by the map fitted on the other half) and three chance
    levels: independent (Σ_c p_c q_c of labels and predictions), majority and uniform."""
    n = len(labels)
    counts = torch.bincount(labels.cpu().long(), minlength=classes)
    predicted = torch.bincount(predictions.long(), minlength=classes)
    return {
        "n_scored": n,
        "halves": [len(p) for p in parts] if parts is not None else None,
        "half_accuracy": [float(correct[p].float().mean()) for p in parts] if parts is not None else None,
        "chance_independent": float((counts.double() * predicted.double()).sum()) / (n * n),
        "chance_majority": float(counts.max()) / n,
        "chance_uniform": 1.0 / classes,
    }


def fit_summary(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """The fits' objective values and how far their matrices are from orthogonal (worst over fits)."""
    return {
        "final_loss": sum(f["final_loss"] for f in fits) / len(fits),
        "fit_losses": [f["final_loss"] for f in fits],
        "fit_l1": [f["fit_l1"] for f in fits],
        "orth_dev_max": max(f["orth_dev_max"] for f in fits),
        "orth_dev_fro": max(f["orth_dev_fro"] for f in fits),
        "log_abs_det": min(f["log_abs_det"] for f in fits),
        "fits": fits,
    }


def aligned(ctx: ProtocolContext, *, seed: int = 0, shots: int = 0, **options: Any) -> ProtocolOutcome:
    """Aligned Eval with ``transform`` fitted on the unlabelled eval split (transductive), cross-fitted by
    default (``fit``), optionally as its shuffled-pairs noise control (``control``); options: ``AlignedOptions``.

    ``seed`` picks the halves, the control's permutation and a random init; ``shots`` is ignored.
    """
    opts = AlignedOptions.parse(options)
    finetuned = ctx.require_finetuned("aligned")
    merged_split, finetuned_split = paired_split(
        ctx.task, ctx.evaluated, finetuned, ctx.eval_split, "merged and fine-tuned"
    )
    source, target = merged_split.features.float(), finetuned_split.features.float()
    labels = merged_split.labels
    n = len(labels)
    if opts.control == "shuffled":  # item i keeps its fine-tuned features and label, gets another item's merged row
        source = source[shuffled_rows(n, seed, "aligned-control")]
    mapped, fits, parts = fit_and_map(source, target, opts, seed)
    logits = head_logits(ctx.head, mapped)
    check_labels_fit(ctx.task, merged_split, logits.shape[1], ctx.eval_split)
    predictions = logits.argmax(dim=1).cpu()
    correct = predictions == labels.cpu()
    with torch.no_grad():
        extras = {"transform": opts.transform, "fit": opts.fit, "control": opts.control, "solver": opts.solver,
                  **score_facts(correct, labels, predictions, logits.shape[1], parts),
                  "l1_before": float((source - target).abs().mean()),
                  # cross: held-out (each item mapped by the map that did not see it); in-sample: on the fitted pairs
                  "l1_after": float((mapped - target).abs().mean()),
                  **fit_summary(fits)}  # fmt: skip
    if opts.control == "shuffled":
        extras["control_gap"] = int(correct.sum()) / n - extras["chance_independent"]
    return outcome(logits, labels, transductive=True, **extras)


# ------------------------------------------------------------------------------------------------------------
# cells (stored names)


def cell_name(transform: str, fit: str = "cross", control: str = "none") -> str:
    """Stored protocol name of one aligned cell: ``aligned:{t}`` (cross-fitted), ``aligned-control:{t}`` (its
    shuffled-pairs control), ``aligned-insample:{t}`` / ``aligned-insample-control:{t}`` (fitted and scored on
    the same items)."""
    kind = "aligned" if fit == "cross" else "aligned-insample"
    return f"{kind}-control:{transform}" if control == "shuffled" else f"{kind}:{transform}"


def aligned_cells(transforms: Sequence[str], options: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(stored name, options) per transform: the fit and its noise control, unless ``options`` fix ``control``.
    ``fit`` comes from ``options`` (default cross) and is passed explicitly, so the name says what ran. Every
    cell's options (``options`` with the cell's own) are validated here, before anything runs."""
    fit, fixed = options.get("fit", "cross"), options.get("control")
    controls = [fixed] if fixed is not None else list(CONTROLS)
    cells = [(cell_name(t, fit, c), {"transform": t, "fit": fit, "control": c}) for t in transforms for c in controls]
    for _, cell in cells:
        AlignedOptions.parse({**options, **cell})
    return cells
