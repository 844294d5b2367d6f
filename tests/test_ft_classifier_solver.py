"""FT-Classifier, both ways: the reference schedule (the paper's code) and the head refit solved by L-BFGS.

The refit of a linear head on fixed features minimises a convex KL(p_teacher ‖ p_student); the reference schedule
(Adam 5e-4, 5 epochs, batch 1) stops after 5·n steps wherever it is, the converged solver runs to a gradient
tolerance. Hand-checked cases: teacher logits a linear head on the student features can produce (minimum KL = 0,
the teacher's probabilities reproduced), and identical inputs with different teacher probabilities (the best
student probability is their mean, the minimum KL is known in closed form).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core import sampling
from mergelab.core.errors import ConfigError
from mergelab.evaluation.api import expand_cells
from mergelab.evaluation.protocols.common import ProtocolContext, head_logits
from mergelab.evaluation.protocols.ft_classifier import full_batch_kl, refit_head, solve_head
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.evaluation.types import SplitFeatures, TaskFeatures

D, C, N = 8, 3, 30


pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Seeded random student features, a small Linear head, teacher logits from another head on other features
    (no linear head on the student features reproduces them: the minimum KL is positive)."""
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(N, D, generator=g)
    y = x @ (torch.eye(D) + 0.5 * torch.randn(D, D, generator=g)) + torch.randn(N, D, generator=g)
    head, teacher_head = nn.Linear(D, C), nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(0.1 * torch.randn(C, D, generator=g))
        head.bias.zero_()
        teacher_head.weight.copy_(0.3 * torch.randn(C, D, generator=g))
        teacher_head.bias.copy_(torch.randn(C, generator=g))
    return head, x, teacher_head(y).detach()


def test_converged_solver_beats_the_reference_schedule_and_meets_its_tolerance():
    head, x, teacher = fixed_problem()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    reference, _ = refit_head(head, x, teacher, seed=0)  # 5 epochs × 30 samples = 150 Adam steps
    initial, reference_kl = full_batch_kl(head, x, teacher), full_batch_kl(reference, x, teacher)
    solved, info = solve_head(head, x, teacher, tolerance=1e-6)
    assert info["initial_kl"] == pytest.approx(initial, rel=1e-12)
    assert info["converged"] and info["stop"] == "gradient" and info["grad_max"] <= 1e-6
    assert 0.0 < info["final_kl"] < reference_kl < initial  # measured: 1.346 → 1.088 (reference), 0.0345 (converged)
    assert info["final_kl"] < 0.5 * reference_kl
    assert full_batch_kl(solved, x, teacher) == pytest.approx(info["final_kl"], rel=1e-4)  # float32 copy returned
    # the minimum: a long full-batch Adam run on the same convex problem gets no lower
    long, _ = refit_head(head, x, teacher, seed=0, full_batch=True, steps=5000, lr=1e-2)
    assert info["final_kl"] <= full_batch_kl(long, x, teacher) + 1e-9
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # the original head is untouched
    assert solved.weight.dtype == torch.float32 and not solved.training


def test_converged_solver_is_deterministic():
    head, x, teacher = fixed_problem()
    a, info_a = solve_head(head, x, teacher)
    b, info_b = solve_head(head, x, teacher)
    assert info_a == info_b
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_realisable_teacher_is_reproduced_exactly():
    # 1-D features, 2 classes: the teacher head (2, -1; 0.5, 0) on the same features. Only the logit difference
    # matters: (w0 - w1) x + (b0 - b1) = 3x + 0.5 reaches KL = 0, and is the only way to (two distinct x suffice).
    x = torch.tensor([[-2.0], [-1.0], [0.5], [1.0], [3.0]])
    teacher_head = nn.Linear(1, 2)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        teacher_head.bias.copy_(torch.tensor([0.5, 0.0]))
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    solved, info = solve_head(head, x, teacher_head(x).detach(), tolerance=1e-8)
    assert info["converged"] and info["final_kl"] < 1e-12
    assert info["initial_kl"] > 0.1
    w, b = solved.weight.detach().double(), solved.bias.detach().double()
    assert float(w[0, 0] - w[1, 0]) == pytest.approx(3.0, abs=1e-5)
    assert float(b[0] - b[1]) == pytest.approx(0.5, abs=1e-5)
    unseen = torch.tensor([[-5.0], [0.0], [7.0]])  # the teacher's probabilities everywhere, not only on the samples
    p_student = F.softmax(head_logits(solved, unseen), -1)
    p_teacher = F.softmax(teacher_head(unseen).detach(), -1)
    assert torch.allclose(p_student, p_teacher, atol=1e-5)


def test_unrealisable_teacher_reaches_the_closed_form_minimum():
    # every input is the same x = 1, the teacher's class-0 probabilities differ: the best student probability is
    # their mean q = 0.55, and the minimum KL is mean_i KL(Bern(p_i) ‖ Bern(q)).
    p = [0.9, 0.5, 0.1, 0.7]
    q = sum(p) / len(p)
    minimum = sum(pi * math.log(pi / q) + (1 - pi) * math.log((1 - pi) / (1 - q)) for pi in p) / len(p)
    x = torch.ones(len(p), 1)
    teacher = torch.tensor([[math.log(pi), math.log(1 - pi)] for pi in p], dtype=torch.float64)  # exact p_i
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    solved, info = solve_head(head, x, teacher, tolerance=1e-8)
    assert info["converged"]
    assert info["final_kl"] == pytest.approx(minimum, abs=1e-10)  # 0.19959...
    assert float(F.softmax(head_logits(solved, torch.ones(1, 1)), -1)[0, 0]) == pytest.approx(q, abs=1e-6)


# --- through the protocol ---------------------------------------------------------------------------------


def toy_context(seed: int = 0) -> ProtocolContext:
    """Class-clustered features, a small linear head, "merged" features = a random rotation of them."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(16, 4, generator=g))
    centres = 30.0 * basis.T

    def split(n: int) -> SplitFeatures:
        labels = torch.arange(n) % 4
        return SplitFeatures(centres[labels] + 2.0 * torch.randn(n, 16, generator=g), labels)

    finetuned = TaskFeatures("toy", {"train": split(80), "test": split(100)})
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    merged = TaskFeatures("toy", {k: SplitFeatures(v.features @ q.T, v.labels) for k, v in finetuned.splits.items()})
    head = nn.Linear(16, 4)
    with torch.no_grad():
        head.weight.copy_(0.12 * basis.T)
        head.bias.zero_()
    return ProtocolContext(task="toy", evaluated=merged, head=head, finetuned=finetuned)


def test_reference_solver_is_the_unchanged_reference_schedule():
    ctx = toy_context()
    for seed, shots in ((0, 1), (1, 5)):
        default = run_protocol("ft_classifier", ctx, seed=seed, shots=shots)
        explicit = run_protocol("ft_classifier", ctx, seed=seed, shots=shots, solver="reference")
        assert default.accuracy == explicit.accuracy and torch.equal(default.predictions, explicit.predictions)
        assert default.extras == explicit.extras
        # the schedule spelled out by hand: same draw, same teacher, same 5 epochs of batch-1 Adam
        train, ft_train = ctx.evaluated.split("train"), ctx.finetuned.split("train")
        index = sampling.sample_per_class(train.labels, shots, seed, num_classes=4, what="toy")
        teacher = head_logits(ctx.head, ft_train.features[index])
        student, losses = refit_head(ctx.head, train.features[index], teacher, seed=seed)
        predictions = head_logits(student, ctx.evaluated.split("test").features).argmax(dim=1)
        assert torch.equal(default.predictions, predictions) and default.extras["losses"] == losses
        assert default.extras["solver"] == "reference" and default.extras["iterations"] == 5 * 4 * shots
        assert default.extras["final_kl"] == pytest.approx(full_batch_kl(student, train.features[index], teacher))
        assert default.extras["initial_kl"] > default.extras["final_kl"]


def test_converged_protocol_records_the_solve():
    ctx = toy_context()
    reference = run_protocol("ft_classifier", ctx, seed=0, shots=1)
    converged = run_protocol("ft_classifier", ctx, seed=0, shots=1, solver="converged", epochs=2)  # schedule ignored
    extras = converged.extras
    assert {"solver", "initial_kl", "final_kl", "iterations", "grad_max", "grad_norm", "tolerance", "converged",
            "stop", "evaluations", "samples"} <= set(extras)  # fmt: skip
    assert extras["solver"] == "converged" and extras["converged"] and extras["grad_max"] <= extras["tolerance"]
    assert extras["initial_kl"] == pytest.approx(reference.extras["initial_kl"])  # same samples, same start
    assert extras["final_kl"] < reference.extras["final_kl"]
    assert converged.accuracy >= reference.accuracy and converged.transductive is False
    again = run_protocol("ft_classifier", ctx, seed=0, shots=1, solver="converged")
    assert again.extras == extras and torch.equal(again.predictions, converged.predictions)
    with pytest.raises(ConfigError, match="solver"):
        run_protocol("ft_classifier", ctx, solver="exact")
    with pytest.raises(ConfigError, match="deterministic"):
        run_protocol("ft_classifier", ctx, solver="converged", head_dropout=True)


def test_converged_solver_on_a_non_linear_head():
    # non-convex (Linear-tanh-Linear, RoBERTa-style): L-BFGS still runs to a stationary point below the start
    ctx = toy_context(seed=3)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    mlp = ProtocolContext(task="toy", evaluated=ctx.evaluated, head=head, finetuned=ctx.finetuned)
    out = run_protocol("ft_classifier", mlp, seed=0, shots=2, solver="converged")
    assert out.extras["final_kl"] < out.extras["initial_kl"]
    assert out.extras["converged"] or out.extras["stop"] in ("stalled", "max_iter")


def test_cells_run_both_solvers_unless_one_is_fixed():
    cells = expand_cells(["ft_classifier", "current"], shots=[1, 5], num_seeds=2, transforms=[])
    ft = [
        (name, options["solver"], seed, k) for name, protocol, options, seed, k in cells if protocol == "ft_classifier"
    ]
    assert [c for c in ft if c[0] == "ft_classifier"] == [
        ("ft_classifier", "reference", s, k) for s in range(2) for k in (1, 5)
    ]
    assert [c for c in ft if c[0] != "ft_classifier"] == [
        ("ft_classifier:converged", "converged", s, k) for s in range(2) for k in (1, 5)
    ]
    fixed = expand_cells(["ft_classifier"], shots=[5], num_seeds=1, transforms=[],
                         protocol_options={"ft_classifier": {"solver": "converged"}})  # fmt: skip
    assert [(name, options) for name, _, options, _, _ in fixed] == [
        ("ft_classifier:converged", {"solver": "converged"})
    ]
    reference = expand_cells(["ft_classifier"], shots=[5], num_seeds=1, transforms=[],
                             protocol_options={"ft_classifier": {"solver": "reference", "epochs": 2}})  # fmt: skip
    assert [name for name, *_ in reference] == ["ft_classifier"]
