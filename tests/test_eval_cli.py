"""`mergelab eval` and `mergelab.evaluation.api.evaluate` on tiny HF checkpoints."""

from __future__ import annotations

import json

import pandas as pd
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.evaluation.api import evaluate
from tests._text_helpers import make_task, tiny_classifier

runner = CliRunner()


def _setup(tmp_path):
    tasks, experts = {}, {}
    base = tiny_classifier("bert", tmp_path / "cls", seed=0)
    bare = tmp_path / "base"
    AutoModel.from_pretrained(base).save_pretrained(bare)
    AutoTokenizer.from_pretrained(base).save_pretrained(bare)
    for i in range(2):
        task = make_task(f"t{i}", num_classes=3, per_class=8, seed=i)
        folder = tmp_path / f"data{i}"
        folder.mkdir()
        for split, data in task.splits.items():
            pd.DataFrame({"text": data.texts, "label": [task.label_names[y] for y in data.labels]}).to_csv(
                folder / f"{split}.csv", index=False)  # fmt: skip
        tasks[task.name] = folder
        experts[task.name] = tiny_classifier("bert", tmp_path / f"ft{i}", seed=10 + i)
    return bare, experts, tasks


def test_eval_cli_writes_rows_and_prints_table(tmp_path):
    bare, experts, tasks = _setup(tmp_path)
    merged = mergelab.merge("weight_average", bare, list(experts.values()), out=tmp_path / "merged").path
    args = ["eval", "--merged", str(merged), "--protocol", "current,knn,aligned,ft_classifier,linear_probe,ensemble",
            "--shots", "1,2", "--seeds", "2", "--transforms", "procrustes", "--out", str(tmp_path / "rows.json"),
            "--cache-dir", str(tmp_path / "cache"), "--option", "knn.chunk_size=3", "--option", "linear_probe.steps=50"]  # fmt: skip
    for task in experts:
        args += ["--finetuned", f"{task}={experts[task]}", "--data", f"{task}={tasks[task]}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "FT-Classifier" in result.output and "t0" in result.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {"protocol", "task", "seed", "shots", "accuracy", "transductive"} <= set(rows[0])
    protocols = {r["protocol"] for r in rows}
    assert protocols == {"current", "knn", "aligned:procrustes", "aligned-control:procrustes", "ft_classifier",
                         "ft_classifier:converged", "linear_probe", "ensemble"}  # fmt: skip
    assert len([r for r in rows if r["protocol"] == "knn"]) == 2 * 2 * 2  # tasks × seeds × shots
    assert all(r["transductive"] for r in rows if r["protocol"].startswith("aligned"))


def test_evaluate_api_is_deterministic_and_the_base_can_be_evaluated(tmp_path):
    bare, experts, tasks = _setup(tmp_path)
    kwargs = dict(protocols=["knn", "ft_classifier"], shots=[2], num_seeds=2, cache_dir=tmp_path / "c", progress=False)
    first = evaluate(bare, experts, tasks, **kwargs)  # the pretrained base as the evaluated encoder
    second = evaluate(bare, experts, tasks, **kwargs)
    # 2 tasks × (knn + ft_classifier with both solvers) × 2 seeds × 1 shot count
    assert len(first) == 2 * 3 * 2
    assert {(r.task, r.protocol, r.seed) for r in first} == {
        (t, p, s) for t in ("t0", "t1") for p in ("knn", "ft_classifier", "ft_classifier:converged") for s in (0, 1)
    }
    assert all(0.0 <= r.accuracy <= 1.0 and r.normalized_accuracy is not None for r in first)
    assert first == second
    later = evaluate(bare, experts, tasks, **{**kwargs, "seed": 5})
    assert {r.seed for r in later} == {5, 6}


def test_eval_of_an_encoder_of_another_width_is_one_line(tmp_path):
    bare, experts, tasks = _setup(tmp_path)
    wide = tmp_path / "wide"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=AutoTokenizer.from_pretrained(bare).vocab_size, hidden_size=48,
                         num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=64)).save_pretrained(wide)  # fmt: skip
    AutoTokenizer.from_pretrained(bare).save_pretrained(wide)
    result = runner.invoke(app, ["eval", "--merged", str(wide), "--finetuned", f"t0={experts['t0']}",
                                 "--data", f"t0={tasks['t0']}", "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "error: task 't0': the evaluated encoder gives 48-wide features but the task's head takes 32; evaluate an "
        "encoder of the fine-tuned models' architecture (hidden size 32)"
    ], result.output


def test_eval_cli_bad_inputs(tmp_path):
    bare, experts, tasks = _setup(tmp_path)
    result = runner.invoke(app, ["eval", "--merged", str(bare), "--finetuned", f"t0={experts['t0']}",
                                 "--data", f"t1={tasks['t1']}"])  # fmt: skip
    assert result.exit_code != 0 and "unmatched" in result.output
    result = runner.invoke(app, ["eval", "--merged", str(bare), "--finetuned", f"t0={experts['t0']}",
                                 "--data", f"t0={tmp_path / 'nope'}"])  # fmt: skip
    assert result.exit_code != 0 and "does not exist" in result.output
    result = runner.invoke(app, ["eval", "--merged", str(bare), "--finetuned", f"t0={experts['t0']}",
                                 "--data", f"t0={tasks['t0']}", "--protocol", "magic"])  # fmt: skip
    assert result.exit_code != 0 and "unknown protocol" in result.output
