"""FT-Classifier Eval (paper §5, algorithms.md §15.2): refit a copy of the head on few unlabelled inputs.

Student = copy of the task's fine-tuned head on the *evaluated* encoder's features; teacher = the original
head on the *fine-tuned* encoder's features of the same inputs (detached). Loss = KL(p_teacher ‖ p_student),
i.e. ``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")`` as in the reference code,
temperature 1. Labels are never used except to stratify the draw of k inputs per class from the *train* split.

Reference schedule (default): Adam(lr 5e-4, betas 0.9/0.999, wd 0), 5 epochs, batch size 1, order reshuffled
every epoch from a generator seeded by ``seed``: 5·k·C optimiser steps. ``full_batch=True``: ``steps`` Adam
steps on the whole few-shot set at once, same lr; the default ``steps`` is epochs × (number of samples), the
same number of Adam updates as the reference (Adam moves each weight by ~lr per update whatever the batch,
so the head travels about as far). The noise-free gradient gets slightly further: on the rotated toy of the
tests, mean over 8 seeds, 96.8 % (reference) vs 100 % (full batch) at 5 shots, 46 % vs 52 % at 1 shot.
``sample_fraction``: the CV variant of appendix A.2 (the paper's sampling rates 0.5, 1, 2.5, 5 and 10 % of the test
set) — draw that fraction of the *eval* split's inputs (at least one) uniformly with ``seed``
(``core.sampling.sample_fraction``; their labels are not read) instead of k per class; this uses eval inputs, so
the outcome is marked transductive, ``shots`` is ignored and ``extras`` records ``sampling_rate``.
``evaluate(sampling_rates=...)`` / ``mergelab eval --sampling-rate`` / the bench's ``sampling_rates`` run it
as cells of their own (``api.expand_cells``).

The head is trained in eval mode (dropout inside the head off) unless ``head_dropout=True``; the reference
code leaves the merged BERT in train mode (dropout on student features) — features here are cached, so only
dropout layers inside the head can be switched on.

``solver``: ``"reference"`` (default) is the schedule above, unchanged. ``"converged"`` solves the same problem
instead of running a fixed number of steps: full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search,
history 100, float64) on the same few-shot inputs from the same initialisation (the fine-tuned head), until the
largest gradient entry is at most ``tolerance`` (default 1e-4: about 0.1 s for a 20-class 10-shot refit on
384-d features; 1e-6 takes about 1.3 s and changes the KL by < 3e-4), the KL stops changing (|ΔKL| or the step
below 1e-15, a few float64 ulps), or after ``max_iter`` iterations (default 1000). The schedule options (``lr``,
``epochs``, ``batch_size``, ``full_batch``, ``steps``) do not apply to it and are ignored; ``head_dropout`` must stay off (L-BFGS needs a deterministic objective).
For a linear head on fixed features the objective is convex in (W, b) (soft-target cross-entropy of an affine
map), so a point where the gradient vanishes is a global minimum; with at least as many feature dimensions as
samples any teacher logits are reachable and the minimum is KL = 0. A head that is more than a Linear (RoBERTa's
dense-tanh-out, DistilBERT's pre-classifier + ReLU) makes it non-convex: L-BFGS still runs to a stationary
point, which need not be the global minimum.

Both solvers record in ``extras``: ``solver``, ``initial_kl`` and ``final_kl`` (full-batch KL on the few-shot
inputs, in float64, of the head in eval mode — the scored head; for ``converged`` the float64 solution, which is
scored rounded to the features' dtype — so the two solvers compare directly), ``iterations``
(Adam steps, or L-BFGS iterations); the converged solver adds ``grad_max`` (max |gradient| at the end),
``grad_norm`` (its L2 norm), ``tolerance``, ``converged`` (``grad_max ≤ tolerance``), ``stop`` (``gradient``,
``stalled`` or ``max_iter``) and ``evaluations`` (objective evaluations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from mergelab.core import sampling
from mergelab.core.errors import DataError
from mergelab.core.rng import derive_seed
from mergelab.evaluation.protocols.common import (
    ProtocolContext,
    ProtocolOptions,
    ProtocolOutcome,
    check_labels_fit,
    frozen_copy,
    head_logits,
    outcome,
    paired_split,
    seeded,
    trainable_copy,
)

REFERENCE_LR = 5e-4
REFERENCE_EPOCHS = 5
PAIR = "merged and fine-tuned"
SOLVERS = ("reference", "converged")
CONVERGED_TOLERANCE = 1e-4  # max |gradient| at which the converged solver stops; pass tolerance= for tighter
CONVERGED_MAX_ITER = 1000
CONVERGED_CHANGE = 1e-15  # |ΔKL| (and step size) below which L-BFGS has stalled (a few float64 ulps)


class FtClassifierOptions(ProtocolOptions):
    """The refit's schedule (``reference``) or its solve to convergence (``converged``); module doc."""

    protocol: ClassVar[str] = "ft_classifier"
    lr: float = Field(REFERENCE_LR, gt=0, description="Adam learning rate (reference solver)")
    epochs: int = Field(REFERENCE_EPOCHS, gt=0, description="passes over the few-shot set (reference solver)")
    batch_size: int = Field(1, gt=0, description="inputs per Adam step (reference solver)")
    full_batch: bool = Field(False, description="Adam on the whole few-shot set at once (reference solver)")
    steps: int | None = Field(None, gt=0, description="full-batch Adam steps (null: epochs × samples)")
    sample_fraction: float | None = Field(
        None, gt=0, le=1, description="refit on this fraction of the eval inputs (transductive; null: k per class)"
    )
    head_dropout: bool = Field(False, description="train the head with its dropout on (reference solver)")
    solver: Literal[SOLVERS] = Field("reference", description="reference schedule or L-BFGS to convergence")  # type: ignore[valid-type]
    tolerance: float = Field(CONVERGED_TOLERANCE, gt=0, description="max |gradient| to stop at (converged solver)")
    max_iter: int = Field(CONVERGED_MAX_ITER, gt=0, description="L-BFGS iterations at most (converged solver)")

    @model_validator(mode="after")
    def _deterministic_solve(self) -> FtClassifierOptions:
        if self.solver == "converged" and self.head_dropout:
            raise ValueError("solver 'converged' needs a deterministic objective; drop head_dropout or use solver "
                             "'reference'")  # fmt: skip
        return self


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) averaged over the batch (the reference code's direction, temperature 1)."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=-1),
        F.softmax(teacher_logits.detach(), dim=-1),
        reduction="batchmean",
    )


def refit_head(
    head: torch.nn.Module,
    student_features: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    seed: int,
    lr: float = REFERENCE_LR,
    epochs: int = REFERENCE_EPOCHS,
    batch_size: int = 1,
    full_batch: bool = False,
    steps: int | None = None,
    head_dropout: bool = False,
) -> tuple[torch.nn.Module, list[float]]:
    """A refitted deep copy of ``head`` (the original is untouched) and the per-epoch (or final) mean loss."""
    student = trainable_copy(head).to(student_features.device).train(head_dropout)
    teacher_logits = teacher_logits.detach()
    count = len(student_features)
    losses: list[float] = []
    with seeded(derive_seed(seed, "ft_classifier")), torch.enable_grad():
        optimiser = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        if full_batch:
            for _ in range(epochs * count if steps is None else steps):
                optimiser.zero_grad(set_to_none=True)
                loss = kl_teacher_student(student(student_features), teacher_logits)
                loss.backward()
                optimiser.step()
            losses.append(float(loss.detach()))
        else:
            generator = torch.Generator().manual_seed(derive_seed(seed, "ft_classifier-shuffle"))
            for _ in range(epochs):
                total = 0.0
                order = torch.randperm(count, generator=generator)
                for start in range(0, count, batch_size):
                    batch = order[start : start + batch_size].to(student_features.device)
                    optimiser.zero_grad(set_to_none=True)
                    loss = kl_teacher_student(student(student_features[batch]), teacher_logits[batch])
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(batch)
                losses.append(total / count)
    return student.eval(), losses


def full_batch_kl(head: torch.nn.Module, features: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """KL(p_teacher ‖ p_student) of ``head`` in eval mode on the whole set ``features``, in float64."""
    student = frozen_copy(head).to(device=features.device, dtype=torch.float64)
    logits = head_logits(student, features.detach().to(torch.float64))
    return float(kl_teacher_student(logits, teacher_logits.to(device=logits.device, dtype=torch.float64)))


def _lbfgs(params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], tolerance: float, max_iter: int,
           history_size: int) -> dict[str, Any]:  # fmt: skip
    """Run full-batch strong-Wolfe L-BFGS on ``loss_fn`` over ``params``; returns the optimiser's state."""
    optimiser = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        max_eval=4 * max_iter,
        tolerance_grad=tolerance,
        tolerance_change=CONVERGED_CHANGE,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        return loss

    optimiser.step(closure)
    return optimiser.state[params[0]]


def solve_head(
    head: torch.nn.Module,
    student_features: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tolerance: float = CONVERGED_TOLERANCE,
    max_iter: int = CONVERGED_MAX_ITER,
    history_size: int = 100,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A deep copy of ``head`` refitted to convergence (the original is untouched) and what the solve did.

    Full-batch L-BFGS with strong-Wolfe line search on KL(p_teacher ‖ p_student), every parameter of the copy
    trainable, in float64, eval mode; the copy comes back in the features' dtype. Stops when max |gradient| ≤
    ``tolerance`` (``converged``), when the KL or the step stall below ``CONVERGED_CHANGE``, or after
    ``max_iter`` iterations. Deterministic: no randomness is involved.
    """
    dtype = student_features.dtype
    student = trainable_copy(head).to(device=student_features.device, dtype=torch.float64).eval()
    features = student_features.detach().to(torch.float64)
    teacher = teacher_logits.detach().to(device=features.device, dtype=torch.float64)
    params = list(student.parameters())

    def gradient() -> tuple[float, float, float]:
        for param in params:
            param.grad = None
        loss = kl_teacher_student(student(features), teacher)
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        return float(loss.detach()), float(flat.abs().max()), float(flat.norm())

    with torch.enable_grad():
        initial, _, _ = gradient()
        state = _lbfgs(params, lambda: kl_teacher_student(student(features), teacher), tolerance, max_iter,
                       history_size)  # fmt: skip
        final, grad_max, grad_norm = gradient()
    for param in params:
        param.grad = None
        param.requires_grad_(False)
    iterations = int(state.get("n_iter", 0))
    converged = grad_max <= tolerance
    stop = "gradient" if converged else ("max_iter" if iterations >= max_iter else "stalled")
    info = {
        "initial_kl": initial,
        "final_kl": final,
        "iterations": iterations,
        "evaluations": int(state.get("func_evals", 0)),
        "grad_max": grad_max,
        "grad_norm": grad_norm,
        "tolerance": float(tolerance),
        "converged": bool(converged),
        "stop": stop,
    }
    if not all(math.isfinite(v) for v in (initial, final, grad_max)):
        raise DataError(
            f"ft_classifier solver 'converged': the KL or its gradient is not finite ({info}); "
            "check the features and the head for NaN or inf"
        )
    return student.to(dtype=dtype).eval(), info


def reference_steps(count: int, epochs: int, batch_size: int, full_batch: bool, steps: int | None) -> int:
    """Number of Adam updates of the reference schedule on ``count`` samples."""
    if full_batch:
        return epochs * count if steps is None else steps
    return epochs * math.ceil(count / batch_size)


def refit_set(ctx: ProtocolContext, shots: int, seed: int,
              sample_fraction: float | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The refit's inputs (evaluated features) and teacher logits (the head on the fine-tuned features): ``shots``
    train items per class, or a ``sample_fraction`` of the eval split (transductive), drawn with ``seed``."""
    finetuned = ctx.require_finetuned("ft_classifier")
    if sample_fraction is not None:
        merged_pool, finetuned_pool = paired_split(ctx.task, ctx.evaluated, finetuned, ctx.eval_split, PAIR)
        index = sampling.sample_fraction(
            len(merged_pool), sample_fraction, seed, what=f"task '{ctx.task}' {ctx.eval_split} split"
        )
    else:
        merged_pool, finetuned_pool = paired_split(ctx.task, ctx.evaluated, finetuned, "train", PAIR)
        classes = head_logits(ctx.head, merged_pool.features[:1]).shape[1]
        what = f"task '{ctx.task}' train split"
        index = sampling.sample_per_class(merged_pool.labels, shots, seed, num_classes=classes, what=what)
    return merged_pool.features[index], head_logits(ctx.head, finetuned_pool.features[index])


def ft_classifier(ctx: ProtocolContext, *, seed: int = 0, shots: int = 5, **options: Any) -> ProtocolOutcome:
    """FT-Classifier Eval: ``shots`` unlabelled train inputs per class drawn with ``seed`` (module doc; options:
    ``FtClassifierOptions``); ``solver="converged"`` solves the head refit by L-BFGS instead of running the
    reference schedule."""
    opts = FtClassifierOptions.parse(options)
    eval_split = ctx.eval_features()
    transductive = opts.sample_fraction is not None
    inputs, teacher = refit_set(ctx, shots, seed, opts.sample_fraction)
    count = len(inputs)
    rate = {} if opts.sample_fraction is None else {"sampling_rate": opts.sample_fraction}
    if opts.solver == "converged":
        student, info = solve_head(ctx.head, inputs, teacher, tolerance=opts.tolerance, max_iter=opts.max_iter)
        logits = head_logits(student, eval_split.features)
        check_labels_fit(ctx.task, eval_split, logits.shape[1], ctx.eval_split)
        return outcome(logits, eval_split.labels, transductive, samples=count, train_loss=info["final_kl"],
                       solver=opts.solver, **info, **rate)  # fmt: skip
    student, losses = refit_head(
        ctx.head,
        inputs,
        teacher,
        seed=seed,
        lr=opts.lr,
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        full_batch=opts.full_batch,
        steps=opts.steps,
        head_dropout=opts.head_dropout,
    )
    logits = head_logits(student, eval_split.features)
    check_labels_fit(ctx.task, eval_split, logits.shape[1], ctx.eval_split)
    return outcome(
        logits,
        eval_split.labels,
        transductive,
        samples=count,
        train_loss=losses[-1],
        losses=losses,
        solver=opts.solver,
        initial_kl=full_batch_kl(ctx.head, inputs, teacher),
        final_kl=full_batch_kl(student, inputs, teacher),
        iterations=reference_steps(count, opts.epochs, opts.batch_size, opts.full_batch, opts.steps),
        **rate,
    )
