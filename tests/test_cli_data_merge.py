"""`mergelab merge` with data-dependent methods: TASK=PATH pairing, YAML configs, and the same result as the API."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.cli.common import pair_models_with_data
from mergelab.core.errors import ConfigError
from tests._learned_helpers import tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli-data")
    base, finetuned, tasks = tiny_family(root, num_tasks=2, train_steps=10)
    folders = {}
    for name, task in tasks.items():
        folder = root / f"data-{name}"
        folder.mkdir()
        for split, part in task.splits.items():
            pd.DataFrame({"text": part.texts, "label": part.labels}).to_csv(folder / f"{split}.csv", index=False)
        folders[name] = folder
    return base, finetuned, folders


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_tall_consensus_pairs_models_and_data_by_task_name(family, tmp_path):
    base, finetuned, folders = family
    out = tmp_path / "merged"
    args = ["merge", "--method", "tall_consensus", "--base", str(base), "--out", str(out), "--param", "scale=0.8",
            "--param", "lambdas=[0.2, 0.5]",
            "--model", f"task0={finetuned['task0']}", "--model", f"task1={finetuned['task1']}",
            "--data", f"task1={folders['task1']}", "--data", f"task0={folders['task0']}"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "lambdas" in result.output  # what the method chose is printed
    expected = mergelab.merge("tall_consensus", base, finetuned, data=folders, scale=0.8, lambdas=[0.2, 0.5]).state
    written = _weights(out)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor.to(written[name].dtype), msg=name)


def test_a_yaml_config_runs_a_transductive_method(family, tmp_path):
    base, finetuned, folders = family
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "method": "adamerging", "base": str(base), "out": str(tmp_path / "ada"),
        "models": [f"{t}={p}" for t, p in finetuned.items()], "data": [f"{t}={p}" for t, p in folders.items()],
        "params": {"steps": 2, "batch_size": 4, "granularity": "task"}, "max_length": 32,
    }))  # fmt: skip
    result = CliRunner().invoke(app, ["merge", "--config", str(config)])
    assert result.exit_code == 0, result.output
    expected = mergelab.merge("adamerging", base, finetuned, data=folders, max_length=32, steps=2, batch_size=4,
                              granularity="task").state  # fmt: skip
    written = _weights(tmp_path / "ada")
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor.to(written[name].dtype), msg=name)


def test_regmean_through_the_api_and_the_cli_gives_the_same_weights(family, tmp_path):
    base, finetuned, folders = family
    result = mergelab.merge("regmean", base, finetuned, data=folders, num_examples=6, alpha=0.9)
    assert result.reads == "train" and not result.transductive and result.info["solved_linear_weights"] == 7
    out = tmp_path / "regmean"
    args = ["merge", "--method", "regmean", "--base", str(base), "--out", str(out), "--param", "num_examples=6",
            "--param", "alpha=0.9"]  # fmt: skip
    for task in finetuned:  # unnamed: paired by order, as the API pairs a list
        args += ["--model", str(finetuned[task]), "--data", str(folders[task])]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 0, cli.output
    assert "solved_linear_weights" in cli.output and '"split": "train"' in cli.output
    written = _weights(out)
    assert set(written) == set(result.state)
    for name, tensor in result.state.items():
        assert torch.equal(written[name], tensor), name


def test_pairing_rules_by_hand():
    assert pair_models_with_data(["a", "b"], ["x", "y"]) == ({"task0": "a", "task1": "b"}, {"task0": "x", "task1": "y"})
    assert pair_models_with_data(["s=a", "t=b"], ["t=y", "s=x"]) == ({"s": "a", "t": "b"}, {"t": "y", "s": "x"})
    with pytest.raises(ConfigError, match="either name every"):
        pair_models_with_data(["s=a", "b"], ["s=x", "y"])
    with pytest.raises(ConfigError, match="same tasks"):
        pair_models_with_data(["s=a"], ["t=x"])
    with pytest.raises(ConfigError, match="one --data PATH per --model"):
        pair_models_with_data(["a", "b"], ["x"])
    with pytest.raises(ConfigError, match="named twice"):
        pair_models_with_data(["s=a", "s=b"], ["s=x"])


def test_bad_cli_input_is_one_clear_line_and_writes_nothing(family, tmp_path):
    base, finetuned, folders = family
    out = tmp_path / "nothing"
    common = ["merge", "--base", str(base), "--out", str(out)]
    runner = CliRunner()
    data_for_weights = runner.invoke(app, [*common, "--method", "task_arithmetic", "--model", str(finetuned["task0"]),
                                           "--model", str(finetuned["task1"]), "--data", str(folders["task0"])])
    assert data_for_weights.exit_code == 1 and "only for data-dependent methods" in data_for_weights.output
    no_data = runner.invoke(app, [*common, "--method", "regmean", "--model", str(finetuned["task0"])])
    assert no_data.exit_code == 1 and "pass data=" in no_data.output and len(no_data.output.strip().splitlines()) == 1
    wrong_task = runner.invoke(app, [*common, "--method", "regmean", "--model", f"task0={finetuned['task0']}",
                                     "--model", f"task1={finetuned['task1']}", "--data", f"task0={folders['task0']}",
                                     "--data", f"task9={folders['task1']}"])  # fmt: skip
    assert wrong_task.exit_code == 1 and "task9" in wrong_task.output
    bad_param = runner.invoke(app, [*common, "--method", "tall_consensus", "--param", "min_tasks=-1",
                                    "--model", str(finetuned["task0"]), "--model", str(finetuned["task1"]),
                                    "--data", str(folders["task0"]), "--data", str(folders["task1"])])  # fmt: skip
    assert bad_param.exit_code == 1 and "min_tasks" in bad_param.output
    assert not out.exists()


def test_neulig_from_the_cli_prints_and_writes_merge_vs_ensemble(family, tmp_path):
    import json

    _, finetuned, folders = family
    out = tmp_path / "neulig.json"
    args = ["neulig", "--steps", "5", "--train-examples", "8", "--test-examples", "8", "--eval-batch-size", "4",
            "--out", str(out)]  # fmt: skip
    for task in finetuned:
        args += ["--model", f"{task}={finetuned[task]}", "--data", f"{task}={folders[task]}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "gap (first)" in result.output and "average" in result.output
    written = json.loads(out.read_text())
    assert set(written["variants"]) == {"first", "mean"} and set(written["variants"]["mean"]) == {"task0", "task1"}
    row = written["variants"]["first"]["task0"]
    assert row["gap"] == pytest.approx(row["ensemble"] - row["merge"])
    bad = CliRunner().invoke(app, ["neulig", "--model", f"task0={finetuned['task0']}", "--data", str(folders["task0"])])
    assert bad.exit_code == 1 and "either name every" in bad.output
    rule = CliRunner().invoke(app, [*args, "--weights-from", "last"])
    assert rule.exit_code == 1 and "weights_from" in rule.output
