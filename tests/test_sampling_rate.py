"""Sampling-rate FT-Classifier (the paper's CV appendix): a fraction of the unlabelled *test* inputs, transductive,
a first-class option beside k-shot in expand_cells, evaluate, `mergelab eval` and the bench config."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import mergelab
from mergelab.bench.cells import protocol_cells
from mergelab.bench.config import ExperimentConfig, demo_config, load_experiment_config
from mergelab.cli import app
from mergelab.cli.evaluate import parse_rates
from mergelab.core.errors import ConfigError
from mergelab.core.sampling import sample_fraction
from mergelab.evaluation.api import expand_cells, task_rows
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.ft_classifier import refit_set
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.evaluation.results import rate_label, rate_protocol, split_rate
from mergelab.evaluation.types import SplitFeatures, TaskFeatures
from tests.test_eval_cli import _setup

D, C = 6, 3


def toy(n_test: int = 40, seed: int = 0) -> tuple[TaskFeatures, TaskFeatures, nn.Linear]:
    """Fine-tuned and evaluated (rotated) features; train rows live far from test rows (offset 100), so a refit
    input can be told apart as a train or a test row."""
    g = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.randn(C, D, generator=g)

    def split(n: int, offset: float) -> SplitFeatures:
        labels = torch.arange(n) % C
        return SplitFeatures(centres[labels] + torch.randn(n, D, generator=g) + offset, labels)

    finetuned = TaskFeatures("toy", {"train": split(5 * C, 100.0), "test": split(n_test, 0.0)})
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    evaluated = TaskFeatures("toy", {k: SplitFeatures(s.features @ rotation, s.labels) for k, s in finetuned.splits.items()})
    head = nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(0.3 * centres)
        head.bias.zero_()
    return finetuned, evaluated, head


def context(finetuned: TaskFeatures, evaluated: TaskFeatures, head: nn.Module) -> ProtocolContext:
    return ProtocolContext("toy", evaluated, head, finetuned)


def relabelled(features: TaskFeatures, labels: torch.Tensor) -> TaskFeatures:
    test = features.split("test")
    return TaskFeatures(features.task, {**features.splits, "test": SplitFeatures(test.features, labels)})


# ---------------------------------------------------------------------------------------------- names and cells


def test_rates_are_shown_as_percentages_and_name_their_cells():
    assert [rate_label(r) for r in (0.005, 0.01, 0.025, 0.05, 0.1, 1.0)] == ["0.5%", "1%", "2.5%", "5%", "10%", "100%"]
    assert rate_protocol("ft_classifier:converged", 0.025) == "ft_classifier:converged@2.5%"
    assert split_rate("ft_classifier:converged@2.5%") == ("ft_classifier:converged", "2.5%")
    assert split_rate("aligned:procrustes") == ("aligned:procrustes", None)


def test_expand_cells_adds_rate_cells_of_ft_classifier_only_and_keeps_the_k_shot_cells():
    args = (["current", "knn", "ft_classifier", "surgery"], [1, 5], 2, ["orthogonal"])
    plain = expand_cells(*args)
    assert expand_cells(*args, sampling_rates=()) == plain
    rated = expand_cells(*args, sampling_rates=[0.005, 0.01])
    assert [c for c in rated if c in plain] == plain  # every earlier cell, in the same order
    extra = [c for c in rated if c not in plain]
    assert extra == [
        ("ft_classifier@0.5%", "ft_classifier", {"solver": "reference", "sample_fraction": 0.005}, 0, 0),
        ("ft_classifier@0.5%", "ft_classifier", {"solver": "reference", "sample_fraction": 0.005}, 1, 0),
        ("ft_classifier@1%", "ft_classifier", {"solver": "reference", "sample_fraction": 0.01}, 0, 0),
        ("ft_classifier@1%", "ft_classifier", {"solver": "reference", "sample_fraction": 0.01}, 1, 0),
        ("ft_classifier:converged@0.5%", "ft_classifier", {"solver": "converged", "sample_fraction": 0.005}, 0, 0),
        ("ft_classifier:converged@0.5%", "ft_classifier", {"solver": "converged", "sample_fraction": 0.005}, 1, 0),
        ("ft_classifier:converged@1%", "ft_classifier", {"solver": "converged", "sample_fraction": 0.01}, 0, 0),
        ("ft_classifier:converged@1%", "ft_classifier", {"solver": "converged", "sample_fraction": 0.01}, 1, 0),
    ]  # fmt: skip
    fixed = expand_cells(["ft_classifier"], [5], 1, [], {"ft_classifier": {"solver": "converged"}}, sampling_rates=[0.1])
    assert [c[0] for c in fixed] == ["ft_classifier:converged", "ft_classifier:converged@10%"]


@pytest.mark.parametrize("rates, message", [
    ([0.0], "in (0, 1]"), ([1.5], "in (0, 1]"), ([True], "in (0, 1]"), (["1%"], "in (0, 1]"),
    ([0.01, 0.01], "repeat"),
])  # fmt: skip
def test_a_bad_rate_is_one_line(rates, message):
    with pytest.raises(ConfigError) as info:
        expand_cells(["ft_classifier"], [5], 1, [], sampling_rates=rates)
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- the protocol


def test_rate_one_refits_on_every_test_input_in_order():
    finetuned, evaluated, head = toy()
    inputs, teacher = refit_set(context(finetuned, evaluated, head), 5, seed=3, sample_fraction=1.0)
    assert torch.equal(inputs, evaluated.split("test").features)
    assert torch.allclose(teacher, head(finetuned.split("test").features).detach())
    out = run_protocol("ft_classifier", context(finetuned, evaluated, head), seed=3, sample_fraction=1.0)
    assert out.extras["samples"] == 40 and out.extras["sampling_rate"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_sample_is_a_seeded_uniform_subset_of_the_test_inputs(seed):
    finetuned, evaluated, head = toy(n_test=200)
    inputs, _ = refit_set(context(finetuned, evaluated, head), 5, seed=seed, sample_fraction=0.05)
    test = evaluated.split("test").features
    matches = (inputs[:, None, :] == test[None, :, :]).all(-1)  # [10, 200]: which test row each input is
    assert len(inputs) == 10 and bool(matches.any(1).all())  # every input is a test row (train rows sit at +100)
    rows = matches.float().argmax(1)
    assert torch.equal(rows, sample_fraction(200, 0.05, seed))  # the core.sampling draw with the cell's seed


@pytest.mark.parametrize("n_test, rate, count", [
    (200, 0.005, 1), (200, 0.01, 2), (200, 0.025, 5), (200, 0.05, 10), (200, 0.1, 20),
    (40, 0.001, 1),  # at least one input
    (10, 0.25, 2),  # round(2.5) = 2
])  # fmt: skip
def test_hand_checked_sample_sizes(n_test, rate, count):
    finetuned, evaluated, head = toy(n_test=n_test)
    out = run_protocol("ft_classifier", context(finetuned, evaluated, head), seed=0, sample_fraction=rate,
                       solver="converged")  # fmt: skip
    assert out.extras["samples"] == count


@pytest.mark.parametrize("solver", ["reference", "converged"])
def test_labels_are_never_read(solver):
    finetuned, evaluated, head = toy()
    shuffled = torch.randperm(40, generator=torch.Generator().manual_seed(5)) % C  # other labels, same inputs
    assert not torch.equal(shuffled, evaluated.split("test").labels)
    runs = [run_protocol("ft_classifier", context(f, e, head), seed=2, sample_fraction=0.25, solver=solver)
            for f, e in [(finetuned, evaluated), (relabelled(finetuned, shuffled), relabelled(evaluated, shuffled))]]  # fmt: skip
    assert torch.equal(runs[0].predictions, runs[1].predictions)  # the same refitted head on the same inputs
    assert runs[0].extras["final_kl"] == runs[1].extras["final_kl"]
    assert runs[0].extras["samples"] == runs[1].extras["samples"] == 10


def test_the_refit_fixes_a_rotation_and_both_solvers_see_the_same_draw():
    finetuned, evaluated, head = toy(n_test=200)
    ctx = context(finetuned, evaluated, head)
    current = run_protocol("current", ctx).accuracy
    upper = run_protocol("current", context(finetuned, finetuned, head)).accuracy
    out = run_protocol("ft_classifier", ctx, seed=0, sample_fraction=0.1, solver="converged")
    assert current < 0.5 < 0.85 < out.accuracy <= upper  # 20 unlabelled test inputs undo most of the rotation
    reference = run_protocol("ft_classifier", ctx, seed=0, sample_fraction=0.1)
    assert reference.extras["samples"] == out.extras["samples"] == 20


def test_rate_rows_are_transductive_and_k_shot_rows_are_not():
    finetuned, evaluated, head = toy()
    cells = expand_cells(["ft_classifier"], [2], 1, [], {"ft_classifier": {"solver": "converged"}}, sampling_rates=[0.1])
    rows = {r.protocol: r for r in task_rows(context(finetuned, evaluated, head), cells, {}, "merged")}
    assert set(rows) == {"ft_classifier:converged", "ft_classifier:converged@10%"}
    assert rows["ft_classifier:converged@10%"].transductive and rows["ft_classifier:converged@10%"].shots == 0
    assert rows["ft_classifier:converged@10%"].extras["sampling_rate"] == 0.1
    assert not rows["ft_classifier:converged"].transductive


# ---------------------------------------------------------------------------------------------- bench config


def test_the_bench_config_omits_unset_rates_and_adds_rate_cells():
    cfg = demo_config()
    assert "sampling_rates" not in cfg.model_dump()
    rated = ExperimentConfig.model_validate({**cfg.model_dump(), "sampling_rates": [0.01, 0.005]})
    assert rated.model_dump()["sampling_rates"] == [0.005, 0.01]
    plain, cells = protocol_cells(cfg, cfg.protocols), protocol_cells(rated, rated.protocols)
    assert [c for c in cells if c in plain] == plain
    extra = [c for c in cells if c not in plain]
    assert {c[0] for c in extra} == {"ft_classifier@0.5%", "ft_classifier@1%", "ft_classifier:converged@0.5%",
                                     "ft_classifier:converged@1%"}  # fmt: skip
    assert all(c[4] == 0 and c[2]["sample_fraction"] in (0.005, 0.01) for c in extra)
    assert len(extra) == 2 * 2 * cfg.seeds  # solvers × rates × seeds


@pytest.mark.parametrize("patch, message", [
    ({"sampling_rates": [0.0]}, "fractions in (0, 1]"),
    ({"sampling_rates": []}, "non-empty"),
    ({"sampling_rates": [0.01], "protocols": ["current", "knn"]}, "add one to protocols"),
])  # fmt: skip
def test_bad_bench_rates_fail_at_load_time(tmp_path, patch, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "t"}], **patch}))
    with pytest.raises(ConfigError, match="sampling_rates") as info:
        load_experiment_config(path)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_rates_parse_as_fractions_or_percentages():
    assert parse_rates(["0.005,1%", " 2.5% ", "0.1"]) == pytest.approx([0.005, 0.01, 0.025, 0.1])
    with pytest.raises(ConfigError, match="--sampling-rate"):
        parse_rates(["one percent"])


def test_eval_cli_with_a_sampling_rate(tmp_path):
    bare, experts, tasks = _setup(tmp_path)
    merged = mergelab.merge("weight_average", bare, list(experts.values()), out=tmp_path / "merged").path
    out = tmp_path / "rows.json"
    args = ["eval", "--merged", str(merged), "--protocol", "current,ft_classifier", "--shots", "1", "--seeds", "2",
            "--sampling-rate", "0.25", "--sampling-rate", "50%", "--option", "ft_classifier.solver=converged",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    for task in experts:
        args += ["--finetuned", f"{task}={experts[task]}", "--data", f"{task}={tasks[task]}"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    rated = [r for r in rows if "@" in r["protocol"]]
    assert {r["protocol"] for r in rated} == {"ft_classifier:converged@25%", "ft_classifier:converged@50%"}
    assert len(rated) == 2 * 2 * 2 and all(r["transductive"] and r["shots"] == 0 for r in rated)  # rates×seeds×tasks
    assert not any(r["transductive"] for r in rows if r["protocol"] == "ft_classifier:converged")
    assert "25%" in result.output and "50%" in result.output and "†" in result.output
    bad = CliRunner().invoke(app, [*args[:4], "current,knn", *args[5:]])
    assert bad.exit_code == 1 and "sampling rates apply to" in bad.output
