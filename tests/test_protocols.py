"""Evaluation protocols on synthetic class-clustered features and an exact rotation of them.

Toy: d = 16, 4 classes, Gaussian clusters around orthogonal centres of norm 30, and a linear head w_c =
0.12·u_c (u_c the unit centre direction): small weights and large features, the regime of a fine-tuned BERT
head (entries of a few hundredths), which the reference FT-Classifier schedule (lr 5e-4, 5 epochs, batch 1) is
made for. "Merged" features = the fine-tuned ones rotated by a random orthogonal Q.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.evaluation.protocols import aligned as aligned_mod
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.ft_classifier import kl_teacher_student, refit_head
from mergelab.evaluation.protocols.knn import mean_distance_scores
from mergelab.evaluation.protocols.registry import get_protocol, protocol_infos, run_protocol
from mergelab.evaluation.protocols.surgery import SurgeryAdapter
from mergelab.evaluation.types import SplitFeatures, TaskFeatures

D, C = 16, 4


def random_orthogonal(d: int, generator: torch.Generator, det: float | None = None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if det is not None and torch.sign(torch.linalg.det(q)) != det:
        q[:, 0] = -q[:, 0]
    return q


def transform(features: TaskFeatures, fn) -> TaskFeatures:
    return TaskFeatures(
        features.task, {k: SplitFeatures(fn(v.features), v.labels) for k, v in features.splits.items()}
    )


class Toy:
    def __init__(self, seed: int = 0, det: float | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(D, C, generator=g))
        centres = 30.0 * basis.T

        def split(n: int) -> SplitFeatures:
            labels = torch.arange(n) % C
            return SplitFeatures(centres[labels] + 2.0 * torch.randn(n, D, generator=g), labels)

        self.finetuned = TaskFeatures(
            "toy", {"train": split(40 * C), "validation": split(80), "test": split(200)}
        )
        self.head = nn.Linear(D, C)
        with torch.no_grad():
            self.head.weight.copy_(0.12 * basis.T)
            self.head.bias.zero_()
        self.q = random_orthogonal(D, g, det)
        self.rotated = transform(self.finetuned, lambda f: f @ self.q.T)

    def ctx(self, merged: TaskFeatures | None = None, **kw) -> ProtocolContext:
        return ProtocolContext(
            task="toy",
            evaluated=self.rotated if merged is None else merged,
            head=self.head,
            finetuned=self.finetuned,
            **kw,
        )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy() -> Toy:
    return Toy()


@pytest.fixture(scope="module")
def upper(toy: Toy) -> float:
    return run_protocol("current", toy.ctx(toy.finetuned)).accuracy


@pytest.fixture(scope="module")
def lower(toy: Toy) -> float:
    return run_protocol("current", toy.ctx()).accuracy


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_names_flags_and_errors(toy: Toy):
    infos = protocol_infos()
    assert list(infos) == [
        "current",
        "knn",
        "aligned",
        "ft_classifier",
        "linear_probe",
        "ensemble",
        "surgery",
    ]
    assert {n for n, i in infos.items() if i.transductive} == {"aligned", "surgery"}
    assert {n for n, i in infos.items() if i.single_cell} == {"current", "aligned", "ensemble", "surgery"}
    with pytest.raises(ConfigError, match="unknown protocol 'nope'.*current, knn, aligned"):
        get_protocol("nope")
    with pytest.raises(ConfigError, match="'bogus'.*its options are: transform, steps"):
        run_protocol("aligned", toy.ctx(), transform="procrustes", bogus=1)
    with pytest.raises(ConfigError, match="its options are: .none."):
        run_protocol("current", toy.ctx(), lr=1.0)
    with pytest.raises(ConfigError, match="protocol 'aligned': option 'transform' must be one of affine, .*got 'shear'"):
        run_protocol("aligned", toy.ctx(), transform="shear")
    with pytest.raises(ConfigError, match="'lr' must be a positive number"):
        run_protocol("ft_classifier", toy.ctx(), lr=-1.0)
    with pytest.raises(ConfigError, match="'weight_decay' must be a number >= 0, got -1.0"):
        run_protocol("linear_probe", toy.ctx(), weight_decay=-1.0)
    with pytest.raises(ConfigError, match="'alpha' must be a number >= 0"):
        run_protocol("aligned", toy.ctx(), alpha=-1.0)


def test_missing_inputs_raise_data_errors(toy: Toy):
    no_teacher = ProtocolContext(task="toy", evaluated=toy.rotated, head=toy.head)
    for name in ("aligned", "ft_classifier", "surgery"):
        with pytest.raises(DataError, match=f"'{name}' on task 'toy' needs the fine-tuned"):
            run_protocol(name, no_teacher)
    with pytest.raises(DataError, match="ensemble_features"):
        run_protocol("ensemble", no_teacher)
    shuffled = transform(toy.finetuned, lambda f: f)  # a fresh splits dict
    shuffled.splits["test"] = SplitFeatures(
        toy.finetuned.splits["test"].features[:-1], toy.finetuned.splits["test"].labels[:-1]
    )
    mismatched = ProtocolContext(task="toy", evaluated=toy.rotated, head=toy.head, finetuned=shuffled)
    with pytest.raises(DataError, match="same inputs in the same order"):
        run_protocol("aligned", mismatched, transform="procrustes")
    no_split = ProtocolContext(task="toy", evaluated=TaskFeatures("toy", {}), head=toy.head)
    with pytest.raises(DataError, match="has no 'test' split"):
        run_protocol("current", no_split)
    wrong_head = ProtocolContext(task="toy", evaluated=toy.rotated, head=nn.Linear(D, 2))
    with pytest.raises(DataError, match="head has 2 outputs"):
        run_protocol("current", wrong_head)


# --- current / knn ----------------------------------------------------------------------------------------


def test_current_drops_under_rotation_and_is_exact_argmax(toy: Toy, upper: float, lower: float):
    assert upper == 1.0
    assert lower < 0.5
    out = run_protocol("current", toy.ctx())
    test = toy.rotated.split("test")
    assert torch.equal(out.predictions, toy.head(test.features).argmax(1))
    assert out.transductive is False
    assert out.accuracy == pytest.approx(float((out.predictions == test.labels).float().mean()))


def test_current_uses_the_eval_split(toy: Toy):
    # the validation split with every label flipped: scoring it must use its own labels and features, not test's
    val = toy.finetuned.split("validation")
    flipped = SplitFeatures(val.features, (val.labels + 1) % C)
    features = TaskFeatures("toy", {**toy.finetuned.splits, "validation": flipped})
    on_val = run_protocol("current", toy.ctx(features, eval_split="validation"))
    on_test = run_protocol("current", toy.ctx(features))
    expected = toy.head(val.features).argmax(1)
    assert torch.equal(on_val.predictions, expected)
    assert on_val.accuracy == (expected == flipped.labels).sum().item() / len(flipped)
    assert on_val.accuracy < 0.1 < 0.9 < on_test.accuracy
    assert len(on_test.predictions) == len(toy.finetuned.split("test"))


def test_knn_is_mean_distance_not_centroid_nor_vote():
    # 1-D: x = 0. class 0 anchors {-1, 1} (centroid 0), class 1 anchors {0.9, 0.9}:
    # mean distance 1.0 vs 0.9 -> class 1 (a centroid rule says class 0)
    x = torch.zeros(1, 1)
    scores = mean_distance_scores(
        x, torch.tensor([[-1.0], [1.0], [0.9], [0.9]]), torch.tensor([0, 0, 1, 1]), 2
    )
    assert torch.allclose(scores, torch.tensor([[1.0, 0.9]]))
    # class 0 anchors {0.1, 5, 5}, class 1 anchors {1, 1, 1}: nearest anchor is class 0 (a vote says 0),
    # mean distance 3.37 vs 1 -> class 1
    anchors = torch.tensor([[0.1], [5.0], [5.0], [1.0], [1.0], [1.0]])
    scores = mean_distance_scores(x, anchors, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    assert torch.allclose(scores, torch.tensor([[10.1 / 3, 1.0]]))
    assert int(scores.argmin()) == 1


def test_knn_protocol_on_a_hand_example():
    # train split = exactly k anchors per class, so the draw is all of them
    train = SplitFeatures(torch.tensor([[-1.0], [1.0], [0.9], [0.9]]), torch.tensor([0, 0, 1, 1]))
    test = SplitFeatures(torch.tensor([[0.0], [-3.0]]), torch.tensor([1, 0]))
    ctx = ProtocolContext(
        task="hand", evaluated=TaskFeatures("hand", {"train": train, "test": test}), head=nn.Linear(1, 2)
    )
    out = run_protocol("knn", ctx, seed=0, shots=2)
    assert out.predictions.tolist() == [1, 0] and out.accuracy == 1.0
    with pytest.raises(DataError, match="class 0 has only 2 example"):
        run_protocol("knn", ctx, seed=0, shots=3)


def test_knn_is_rotation_invariant_and_seeded(toy: Toy, upper: float):
    rotated = run_protocol("knn", toy.ctx(), seed=3, shots=5)
    plain = run_protocol("knn", toy.ctx(toy.finetuned), seed=3, shots=5)
    assert torch.equal(rotated.predictions, plain.predictions)
    assert rotated.accuracy >= upper - 0.02
    chunked = run_protocol("knn", toy.ctx(), seed=3, shots=5, chunk_size=7)
    assert torch.equal(chunked.predictions, rotated.predictions)
    # anchors depend on the seed: 1-shot scores change with it
    one = [mean_distance_scores(toy.rotated.split("test").features, *_anchors(toy, s), C) for s in (0, 1)]
    assert not torch.allclose(one[0], one[1])


def _anchors(toy: Toy, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mergelab.core.sampling import sample_per_class

    train = toy.rotated.split("train")
    index = sample_per_class(train.labels, 1, seed, num_classes=C)
    return train.features[index], train.labels[index]


# --- aligned ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["orthogonal", "procrustes"])
def test_aligned_orthogonal_recovers_the_rotation(toy: Toy, upper: float, transform: str):
    out = run_protocol("aligned", toy.ctx(), transform=transform)
    assert out.transductive is True and out.extras["fit"] == "cross"  # held-out by default
    assert out.accuracy >= upper - 0.01
    assert out.extras["orth_dev_max"] < 1e-2 and out.extras["orth_dev_fro"] < 2e-2
    assert out.extras["l1_after"] < 0.2 * out.extras["l1_before"]
    in_sample = run_protocol("aligned", toy.ctx(), transform=transform, fit="in_sample")
    assert in_sample.extras["fit"] == "in_sample" and in_sample.accuracy >= upper - 0.01


def test_procrustes_is_exact_and_centred_variant_recovers_the_translation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=g)
    q = random_orthogonal(8, g)
    fitted = aligned_mod.procrustes(x, x @ q.T)
    assert torch.allclose(fitted.matrix, q, atol=1e-5) and fitted.bias is None
    shift = torch.randn(8, generator=g)
    centred = aligned_mod.procrustes(x, x @ q.T + shift, center=True)
    assert torch.allclose(centred.matrix, q, atol=1e-5) and torch.allclose(centred.bias, shift, atol=1e-5)
    assert not torch.allclose(aligned_mod.procrustes(x, x @ q.T + shift).matrix, q, atol=1e-2)


@pytest.mark.parametrize("family", ["affine", "linear", "invertible", "euclidean", "scaling"])
def test_aligned_families_run_and_respect_their_constraint(toy: Toy, upper: float, family: str):
    x, y = toy.rotated.split("test").features, toy.finetuned.split("test").features
    fitted, diagnostics = aligned_mod.fit_transform(x, y, family, seed=0)
    a = fitted.matrix
    assert math.isfinite(diagnostics["final_loss"])
    assert (fitted.bias is not None) == (family in ("affine", "euclidean"))
    if family == "scaling":
        assert torch.equal(a, torch.diag(torch.diagonal(a)))
    if family == "invertible":
        assert abs(float(torch.linalg.det(a.double()))) > 1e-3
    if family == "euclidean":
        assert float((a.T @ a - torch.eye(D)).abs().max()) < 1e-2
    out = run_protocol("aligned", toy.ctx(), transform=family)
    assert out.extras["transform"] == family
    if family != "scaling":  # a diagonal map cannot undo a rotation; the others can
        assert out.accuracy >= upper - 0.01
    else:
        assert out.extras["l1_after"] < out.extras["l1_before"]


def test_invertible_stays_invertible_when_the_l2_init_is_singular_and_handles_reflections():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, D, generator=g)  # N < d: the ridge solution has rank ≤ 6
    q = random_orthogonal(D, g, det=-1.0)
    fitted, _ = aligned_mod.fit_transform(x, x @ q.T, "invertible", steps=50)
    sign, logabsdet = torch.linalg.slogdet(fitted.matrix.double())
    assert math.isfinite(float(logabsdet)) and float(sign) != 0.0
    toy = Toy(seed=4, det=-1.0)  # a reflection: det Q = -1
    out = run_protocol("aligned", toy.ctx(), transform="invertible")
    assert out.accuracy >= run_protocol("current", toy.ctx(toy.finetuned)).accuracy - 0.01


def test_orthogonal_penalty_pulls_a_scaled_rotation_back_to_orthogonal(toy: Toy):
    scaled = transform(toy.rotated, lambda f: 0.8 * f)
    for solver in ("fast", "adam"):  # fast: exactly on the group; adam: the Eq. 7 penalty pulls it there
        out = run_protocol("aligned", toy.ctx(scaled), transform="orthogonal", solver=solver)
        assert out.extras["orth_dev_max"] < 2e-2  # the L1-best map would be Q/0.8 (AᵀA = 1.56 I)
    linear = run_protocol("aligned", toy.ctx(scaled), transform="linear")
    assert linear.extras["orth_dev_max"] > 0.4


def test_aligned_is_seeded(toy: Toy):
    a = run_protocol("aligned", toy.ctx(), seed=0, transform="orthogonal", steps=30)
    b = run_protocol("aligned", toy.ctx(), seed=0, transform="orthogonal", steps=30)
    c = run_protocol("aligned", toy.ctx(), seed=1, transform="orthogonal", steps=30)
    assert a.extras == b.extras and torch.equal(a.predictions, b.predictions)
    assert a.extras["final_loss"] != c.extras["final_loss"]


# --- ft_classifier ----------------------------------------------------------------------------------------


def test_kl_direction_is_teacher_to_student():
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # p_s = (1/2, 1/2)
    teacher = torch.tensor([[math.log(3.0), 0.0]] * 2)  # p_t = (3/4, 1/4)
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_t || p_s) = 0.130812
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_s || p_t) = 0.143841
    assert float(kl_teacher_student(student, teacher)) == pytest.approx(forward, abs=1e-6)
    assert float(kl_teacher_student(teacher, student)) == pytest.approx(reverse, abs=1e-6)
    assert abs(forward - reverse) > 0.01
    assert float(kl_teacher_student(student, teacher)) == pytest.approx(
        float(F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean"))
    )


def test_refit_loss_is_kl_of_teacher_on_finetuned_to_student_on_merged(toy: Toy):
    merged = toy.rotated.split("train").features[:1]
    teacher = toy.head(toy.finetuned.split("train").features[:1]).detach()
    student0 = toy.head(merged).detach()
    p_t, p_s = F.softmax(teacher, -1), F.softmax(student0, -1)
    expected = float((p_t * (p_t.log() - p_s.log())).sum())
    reverse = float((p_s * (p_s.log() - p_t.log())).sum())
    _, losses = refit_head(toy.head, merged, teacher, seed=0, epochs=1)
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - reverse) > 1e-3


def test_ft_classifier_recovers_most_of_the_gap_and_leaves_the_head_alone(
    toy: Toy, upper: float, lower: float
):
    before = state(toy.head)
    out = run_protocol("ft_classifier", toy.ctx(), seed=0, shots=5)
    assert out.accuracy >= lower + 0.9 * (upper - lower)
    assert out.transductive is False and out.extras["samples"] == 5 * C
    assert len(out.extras["losses"]) == 5 and out.extras["losses"][-1] < out.extras["losses"][0]
    assert all(torch.equal(before[k], v) for k, v in toy.head.state_dict().items())
    assert all(p.requires_grad for p in toy.head.parameters())


def test_ft_classifier_full_batch_matches_the_reference(toy: Toy):
    # same number of Adam updates; the noise-free full-batch gradient gets a little further on this toy
    for seed in (0, 1):
        reference = run_protocol("ft_classifier", toy.ctx(), seed=seed, shots=5)
        full = run_protocol("ft_classifier", toy.ctx(), seed=seed, shots=5, full_batch=True)
        assert reference.accuracy - 0.01 <= full.accuracy <= reference.accuracy + 0.06
        assert len(full.extras["losses"]) == 1
    fewer = run_protocol("ft_classifier", toy.ctx(), seed=1, shots=5, full_batch=True, steps=5)
    assert fewer.accuracy < reference.accuracy - 0.2  # `steps` is honoured


def test_ft_classifier_seeding(toy: Toy):
    a = run_protocol("ft_classifier", toy.ctx(), seed=4, shots=2)
    b = run_protocol("ft_classifier", toy.ctx(), seed=4, shots=2)
    c = run_protocol("ft_classifier", toy.ctx(), seed=5, shots=2)
    assert a.extras["losses"] == b.extras["losses"] and torch.equal(a.predictions, b.predictions)
    assert a.extras["losses"] != c.extras["losses"]  # other samples (and order)


def test_ft_classifier_sample_fraction_is_transductive(toy: Toy, upper: float, lower: float):
    out = run_protocol("ft_classifier", toy.ctx(), seed=1, sample_fraction=0.1)
    assert out.transductive is True and out.extras["samples"] == 20
    assert out.accuracy > lower + 0.5 * (upper - lower)


def test_ft_classifier_with_merged_equal_finetuned_is_current(toy: Toy):
    same = run_protocol("ft_classifier", toy.ctx(toy.finetuned), seed=0, shots=5)
    assert torch.equal(same.predictions, run_protocol("current", toy.ctx(toy.finetuned)).predictions)
    # teacher == student: the KL starts at 0; only float round-off (amplified by Adam) moves it
    assert max(same.extras["losses"]) < 1e-3


def test_ft_classifier_trains_an_mlp_head_copy():
    # DistilBERT-style head: pre_classifier + ReLU + (dropout) + classifier
    toy = Toy(seed=5)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Dropout(0.1), nn.Linear(D, C))
    before = state(head)
    ctx = ProtocolContext(task="toy", evaluated=toy.rotated, head=head, finetuned=toy.finetuned)
    out = run_protocol("ft_classifier", ctx, seed=0, shots=3, head_dropout=True)
    assert out.extras["losses"][-1] < out.extras["losses"][0]
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items()) and head.training


# --- linear probe, ensemble, surgery ----------------------------------------------------------------------


def test_linear_probe_learns_from_labels_and_is_seeded(toy: Toy, upper: float):
    out = run_protocol("linear_probe", toy.ctx(), seed=0, shots=5)
    assert out.accuracy >= upper - 0.02 and out.transductive is False
    again = run_protocol("linear_probe", toy.ctx(), seed=0, shots=5)
    assert torch.equal(out.predictions, again.predictions) and out.extras == again.extras
    assert (
        run_protocol("linear_probe", toy.ctx(), seed=1, shots=1).extras
        != run_protocol("linear_probe", toy.ctx(), seed=2, shots=1).extras
    )


def test_ensemble_of_identical_encoders_is_current(toy: Toy):
    ctx = toy.ctx(ensemble_features=[toy.rotated, toy.rotated, toy.rotated])
    out = run_protocol("ensemble", ctx)
    cur = run_protocol("current", toy.ctx())
    assert torch.equal(out.predictions, cur.predictions) and out.accuracy == cur.accuracy
    assert out.extras["logit_average_accuracy"] == cur.accuracy and out.extras["members"] == 3


class AbsHead(nn.Module):
    """Non-linear head on 1-D features: logits (|f|, 1)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features.abs(), torch.ones_like(features)], dim=1)


def test_ensemble_averages_features_not_logits():
    # members f = 3 and f = -3: mean feature 0 -> logits (0, 1) -> class 1;
    # mean of logits ((3, 1) + (3, 1)) / 2 = (3, 1) -> class 0
    labels = torch.tensor([1])

    def member(value: float) -> TaskFeatures:
        return TaskFeatures("e", {"test": SplitFeatures(torch.tensor([[value]]), labels)})

    ctx = ProtocolContext(
        task="e", evaluated=member(0.5), head=AbsHead(), ensemble_features=[member(3.0), member(-3.0)]
    )
    out = run_protocol("ensemble", ctx)
    assert out.predictions.tolist() == [1] and out.accuracy == 1.0
    assert out.extras["logit_average_accuracy"] == 0.0


def test_surgery_reduces_l1_and_improves_accuracy(toy: Toy, lower: float):
    out = run_protocol("surgery", toy.ctx(), seed=0)
    assert out.transductive is True and out.extras["samples"] == 200
    assert out.extras["l1_after"] < 0.7 * out.extras["l1_before"]
    assert out.accuracy > lower + 0.3
    few = run_protocol("surgery", toy.ctx(), seed=0, samples=12, steps=200)
    assert few.extras["samples"] == 12 and few.extras["l1_after"] < few.extras["l1_before"]
    again = run_protocol("surgery", toy.ctx(), seed=0, samples=12, steps=200)
    assert few.extras == again.extras
    classes = toy.ctx().head.out_features
    shot = run_protocol("surgery", toy.ctx(), seed=1, samples_per_class=2, steps=50)  # FT-Classifier's k × C
    assert shot.extras["samples"] == 2 * classes
    with pytest.raises(ConfigError, match="not both"):
        run_protocol("surgery", toy.ctx(), samples=4, samples_per_class=2)


def test_surgery_cells_cover_every_input_and_each_shot_count():
    from mergelab.evaluation.api import expand_cells

    cells = expand_cells(["surgery", "current"], shots=[1, 5], num_seeds=2, transforms=[])
    surgery = [(seed, k, options) for name, _, options, seed, k in cells if name == "surgery"]
    assert surgery == [(0, 0, {}), (0, 1, {"samples_per_class": 1}), (0, 5, {"samples_per_class": 5}),
                       (1, 1, {"samples_per_class": 1}), (1, 5, {"samples_per_class": 5})]  # fmt: skip
    fixed = expand_cells(["surgery"], shots=[1, 5], num_seeds=2, transforms=[], protocol_options={"surgery": {"samples": 9}})
    assert [(seed, k) for _, _, _, seed, k in fixed] == [(0, 0)]  # a fixed sample count: one cell


def test_surgery_adapter_init():
    torch.manual_seed(0)
    adapter = SurgeryAdapter(D, rank=16)
    assert adapter.down.shape == (16, D) and adapter.up.shape == (D, 16)
    assert torch.count_nonzero(adapter.up) == 0
    assert (
        float(adapter.down.detach().abs().max()) <= 1.0 / math.sqrt(D) + 1e-6
    )  # kaiming_uniform(a=√5) bound = 1/√fan_in
    z = torch.randn(5, D)
    assert torch.equal(adapter(z), z)  # identity at init


def test_protocols_leave_the_global_rng_alone(toy: Toy):
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    run_protocol("ft_classifier", toy.ctx(), seed=0, shots=1)
    run_protocol("surgery", toy.ctx(), seed=0, steps=5)
    assert torch.equal(torch.rand(3), expected)


def test_merged_equal_finetuned_is_a_fixed_point(toy: Toy, upper: float):
    ctx = toy.ctx(toy.finetuned)
    proc = run_protocol("aligned", ctx, transform="procrustes")
    assert proc.accuracy == upper and proc.extras["l1_after"] < 1e-4
    surgery = run_protocol("surgery", ctx, steps=20)
    assert surgery.extras["l1_before"] == 0.0 and surgery.accuracy == upper


def test_accuracy_is_an_exact_fraction():
    from mergelab.evaluation.protocols.common import accuracy

    predictions = torch.tensor([1] * 27 + [0] * 53)
    assert accuracy(predictions, torch.ones(80, dtype=torch.long)) == 0.3375  # 27/80, not float32's 0.33750000596
    assert repr(accuracy(torch.tensor([0, 1, 1]), torch.tensor([1, 1, 1]))) == repr(2 / 3)


def test_dense_protocols_are_marked_for_the_benchmarks_threads():
    dense = {name for name, info in protocol_infos().items() if info.dense}
    assert dense == {"aligned", "surgery"}
