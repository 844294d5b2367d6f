"""`mergelab merge` and `mergelab methods` through the CLI: success paths and one-line failures."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app

runner = CliRunner()


def _merge_args(base, models, out, *extra):
    args = ["merge", "--base", str(base), "--out", str(out)]
    for m in models:
        args += ["--model", str(m)]
    return args + list(extra)


def test_cli_merge_matches_api(family, tmp_path):
    base, models = family
    out = tmp_path / "merged"
    result = runner.invoke(app, _merge_args(base, models, out, "--method", "ties", "--param", "density=0.2",
                                            "--param", "scale=0.3", "--max-shard-size", "30KB"))
    assert result.exit_code == 0, result.output
    expected = mergelab.merge("ties", base, models, density=0.2, scale=0.3).state
    reader = mergelab.open_checkpoint(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(reader.get(name), tensor, atol=1e-6, rtol=0)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()


def test_the_merge_command_keeps_freed_memory_for_reuse(family, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("mergelab.core.memory.retain_freed_memory", lambda: calls.append("retain") or True)
    base, models = family
    result = runner.invoke(app, _merge_args(base, models, tmp_path / "m", "--method", "task_arithmetic"))
    assert result.exit_code == 0, result.output
    assert calls == ["retain"]


def test_the_cli_silences_transformers_without_importing_it():
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from mergelab.cli import app
        CliRunner().invoke(app, ["methods"])
        imported = "transformers" in sys.modules
        import transformers.utils.logging as hf_logging
        print(imported, hf_logging.get_verbosity() == hf_logging.ERROR, hf_logging.is_progress_bar_enabled())
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True", "False"]


def test_cli_merge_from_yaml_config(family, tmp_path):
    base, models = family
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"method: task_arithmetic\nbase: {base}\nmodels: [{models[0]}, {models[1]}]\nout: {tmp_path / 'o'}\n"
        "params: {scale: 0.5}\n"
    )
    result = runner.invoke(app, ["merge", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    expected = mergelab.merge("task_arithmetic", base, models[:2], scale=0.5).state
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    torch.testing.assert_close(got["pooler.dense.weight"], expected["pooler.dense.weight"])


def test_cli_config_with_wrong_key_names_it(family, tmp_path):
    base, models = family
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"method: ties\nbase: {base}\nmodel: [{models[0]}]\nout: {tmp_path / 'o'}\n")
    result = runner.invoke(app, ["merge", "--config", str(cfg)])
    assert result.exit_code != 0
    assert "unknown key 'model'" in result.output and "models" in result.output
    assert not (tmp_path / "o").exists()


def test_methods_lists_every_method_with_params():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("weight_average", "task_arithmetic", "ties", "dare", "magmax", "cart", "model_stock"):
        assert name in result.output
    for param in ("density", "scope", "disjoint", "drop_rate", "rank_ratio", "energy"):
        assert param in result.output
    for name in ("regmean", "fisher", "fisher_batch", "adamerging", "tall_consensus", "label_mode", "lambdas"):
        assert name in result.output  # the data-dependent methods and their parameters too
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "reads labelled validation data" in flat and "reads unlabelled test inputs, transductive" in flat
    assert "reads weights only" in flat and "reads unlabelled train inputs" in flat
    # the entries that are not one merged model: what they produce and what runs them
    assert "tall_masks" in flat and "produces one model per task, not a single merged model" in flat
    assert "neulig" in flat and "run: `mergelab neulig`" in flat and "train_examples" in flat and "512" in flat
    assert "pleas" in flat and "run: `mergelab bench pleas`" in flat


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mergelab {mergelab.__version__}"


def _no_output(tmp_path, out):
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "case",
    ["unknown_method", "unknown_param", "out_of_range", "missing_path", "existing_output", "nan", "shape",
     "truncated", "pickle"],
)
def test_cli_bad_inputs_fail_cleanly(family, tmp_path, case):
    base, models = family
    out = tmp_path / "merged"
    models = list(models)
    extra = ["--method", "task_arithmetic"]
    if case == "unknown_method":
        extra = ["--method", "nope"]
    elif case == "unknown_param":
        extra += ["--param", "lambda=0.3"]
    elif case == "out_of_range":
        extra = ["--method", "ties", "--param", "density=2"]
    elif case == "missing_path":
        models[0] = tmp_path / "does-not-exist"
    elif case == "existing_output":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case in ("nan", "shape", "truncated"):
        state = load_file(str(models[1] / "model.safetensors"))
        key = "bert.encoder.layer.1.output.dense.weight"
        if case == "nan":
            state[key][0, 0] = float("inf")
        elif case == "shape":
            state[key] = torch.zeros(2, 2)
        bad = tmp_path / "bad.safetensors"
        from safetensors.torch import save_file

        save_file(state, str(bad))
        if case == "truncated":
            bad.write_bytes(bad.read_bytes()[:-100])
        models[1] = bad
    elif case == "pickle":
        bad = tmp_path / "evil.bin"
        with open(bad, "wb") as handle:
            pickle.dump({"w": _Evil()}, handle)
        models[1] = bad
    result = runner.invoke(app, _merge_args(base, models, out, *extra))
    assert result.exit_code != 0
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    if case == "existing_output":
        assert (out / "keep.txt").read_text() == "precious"
    else:
        assert _no_output(tmp_path, out)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("method", ["weight_average", "task_arithmetic", "ties", "dare", "magmax", "cart", "model_stock"])
def test_every_method_through_the_cli_equals_the_api(family, tmp_path, method):
    base, models = family
    out = tmp_path / method
    result = runner.invoke(app, _merge_args(base, models, out, "--method", method))
    assert result.exit_code == 0, result.output
    expected = mergelab.merge(method, base, models).state
    reader = mergelab.open_checkpoint(out)
    for name, tensor in expected.items():
        assert torch.equal(reader.get(name), tensor), name
