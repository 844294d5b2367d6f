"""Each protocol's options are declared once (a pydantic model in its module) and validated only by it: at run time,
through `validate_protocol_options`, when a benchmark config loads, and by `mergelab eval --option`."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from mergelab.bench.config import ExperimentConfig, builtin_config, load_experiment_config
from mergelab.cli import app
from mergelab.core.errors import ConfigError
from mergelab.evaluation.api import evaluate
from mergelab.evaluation.protocols.aligned import AlignedOptions
from mergelab.evaluation.protocols.common import ProtocolContext, ProtocolOptions
from mergelab.evaluation.protocols.current import CurrentOptions
from mergelab.evaluation.protocols.ensemble import EnsembleOptions
from mergelab.evaluation.protocols.ft_classifier import FtClassifierOptions
from mergelab.evaluation.protocols.knn import KnnOptions
from mergelab.evaluation.protocols.linear_probe import LinearProbeOptions
from mergelab.evaluation.protocols.registry import protocol_infos, run_protocol, validate_protocol_options
from mergelab.evaluation.protocols.surgery import SurgeryOptions
from mergelab.evaluation.results import ResultRow
from mergelab.evaluation.types import SplitFeatures, TaskFeatures

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
D, C = 12, 3

# one bad value per protocol with options: (option, value, what the message says it accepts)
BAD_VALUES = {
    "knn": ("chunk_size", 0, "a positive integer"),
    "aligned": ("fit", "insample", "one of cross, in_sample"),
    "ft_classifier": ("sample_fraction", 1.5, r"a number in \(0, 1\] or null"),
    "linear_probe": ("steps", 2.0, "a positive integer"),
    "surgery": ("lr", True, "a positive number"),
}


def toy_context() -> ProtocolContext:
    g = torch.Generator().manual_seed(0)
    centres = 6.0 * torch.randn(C, D, generator=g)

    def split(n: int, noise: float) -> SplitFeatures:
        labels = torch.arange(n) % C
        return SplitFeatures(centres[labels] + noise * torch.randn(n, D, generator=g), labels)

    finetuned = TaskFeatures("toy", {"train": split(10 * C, 1.0), "test": split(24, 1.0)})
    merged = TaskFeatures("toy", {k: SplitFeatures(v.features + torch.randn(v.features.shape, generator=g), v.labels)
                                  for k, v in finetuned.splits.items()})  # fmt: skip
    head = nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(0.1 * centres)
        head.bias.zero_()
    return ProtocolContext("toy", merged, head, finetuned, [finetuned, merged])


def test_every_protocol_declares_its_options_model():
    infos = protocol_infos()
    assert {name: info.options for name, info in infos.items()} == {
        "current": CurrentOptions, "knn": KnnOptions, "aligned": AlignedOptions, "ft_classifier": FtClassifierOptions,
        "linear_probe": LinearProbeOptions, "ensemble": EnsembleOptions, "surgery": SurgeryOptions,
    }  # fmt: skip
    for name, info in infos.items():
        assert issubclass(info.options, ProtocolOptions) and info.options.protocol == name
    assert not CurrentOptions.model_fields and not EnsembleOptions.model_fields
    assert set(BAD_VALUES) == {name for name, info in infos.items() if info.options.model_fields}


@pytest.mark.parametrize("name", list(protocol_infos()))
def test_an_unknown_option_is_one_line_naming_the_protocol_and_the_known_options(name):
    known = ", ".join(protocol_infos()[name].options.model_fields) or "(none)"
    with pytest.raises(ConfigError) as info:
        validate_protocol_options(name, {"bogus": 1})
    message = str(info.value)
    assert message == f"unknown option(s) 'bogus' for protocol '{name}'; its options are: {known}"
    with pytest.raises(ConfigError, match="unknown option.*'bogus'"):
        protocol_infos()[name].options(bogus=1)  # constructing the model directly says the same


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_a_bad_value_is_one_line_naming_the_option_its_value_and_what_it_accepts(name):
    key, value, accepts = BAD_VALUES[name]
    with pytest.raises(ConfigError) as info:
        validate_protocol_options(name, {key: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"protocol '{name}': option '{key}' must be ")
    assert message.endswith(f", got {value!r}")
    assert re.search(f"must be {accepts}, got", message), message
    with pytest.raises(ConfigError, match=f"protocol '{name}': option '{key}'"):
        run_protocol(name, toy_context(), **{key: value})  # the run validates through the same model


def test_types_are_strict_as_the_protocols_always_checked_them():
    for bad in (True, 5.0, "5"):
        with pytest.raises(ConfigError, match="'chunk_size' must be a positive integer"):
            validate_protocol_options("knn", {"chunk_size": bad})
    with pytest.raises(ConfigError, match="'full_batch' must be true or false, got 1"):
        validate_protocol_options("ft_classifier", {"full_batch": 1})
    with pytest.raises(ConfigError, match="'lr' must be a positive number, got 'fast'"):
        validate_protocol_options("linear_probe", {"lr": "fast"})
    # several bad values: every one in the same line
    with pytest.raises(ConfigError, match="option 'rank' must be .*; option 'steps' must be"):
        validate_protocol_options("surgery", {"rank": 0, "steps": -1})


def test_cross_option_rules_keep_their_messages():
    with pytest.raises(ConfigError, match="^protocol 'aligned': options 'alpha'/'alpha_warmup'.*set solver: adam"):
        validate_protocol_options("aligned", {"alpha": 0.5})
    assert validate_protocol_options("aligned", {"alpha": 0.5, "transform": "procrustes"}) == {
        "alpha": 0.5, "transform": "procrustes"}  # fmt: skip
    with pytest.raises(ConfigError, match="the fast affine solver has no initialisation"):
        validate_protocol_options("aligned", {"transform": "affine", "init": "ridge"})
    with pytest.raises(ConfigError, match="init must be one of procrustes, identity, random, got 'ridge'"):
        validate_protocol_options("aligned", {"init": "ridge"})
    with pytest.raises(ConfigError, match="^protocol 'ft_classifier': solver 'converged' needs a deterministic"):
        validate_protocol_options("ft_classifier", {"solver": "converged", "head_dropout": True})
    with pytest.raises(ConfigError, match="^protocol 'surgery': give samples or samples_per_class, not both$"):
        validate_protocol_options("surgery", {"samples": 4, "samples_per_class": 2})


def test_validation_returns_the_given_options_in_their_declared_types_without_defaults():
    assert validate_protocol_options("knn", {}) == {}
    assert validate_protocol_options("knn", None) == {}
    given = validate_protocol_options("ft_classifier", {"lr": 1, "solver": "converged", "steps": None})
    assert given == {"lr": 1.0, "solver": "converged", "steps": None} and isinstance(given["lr"], float)
    with pytest.raises(ConfigError, match="unknown protocol 'nope'; choose one of: current, knn"):
        validate_protocol_options("nope", {})
    options = AlignedOptions.parse({"transform": "affine"})
    with pytest.raises(Exception, match="frozen"):
        options.transform = "linear"  # type: ignore[misc]


@pytest.mark.parametrize("name", list(protocol_infos()))
def test_a_run_with_no_options_equals_a_run_with_the_models_defaults_spelled_out(name):
    ctx = toy_context()
    defaults = protocol_infos()[name].options().model_dump()
    assert set(defaults) == set(protocol_infos()[name].options.model_fields)
    plain = run_protocol(name, ctx, seed=1, shots=2)
    spelled = run_protocol(name, ctx, seed=1, shots=2, **defaults)
    assert plain.accuracy == spelled.accuracy and torch.equal(plain.predictions, spelled.predictions)
    assert repr(plain.extras) == repr(spelled.extras)


def test_the_defaults_are_the_documented_ones():
    assert KnnOptions().chunk_size == 1024
    assert LinearProbeOptions().model_dump() == {"lr": 1e-2, "steps": 300, "weight_decay": 0.0}
    assert SurgeryOptions().model_dump() == {"samples": None, "samples_per_class": None, "rank": 16, "steps": 1000,
                                             "batch_size": 16, "lr": 1e-3}  # fmt: skip
    assert FtClassifierOptions().model_dump() == {
        "lr": 5e-4, "epochs": 5, "batch_size": 1, "full_batch": False, "steps": None, "sample_fraction": None,
        "head_dropout": False, "solver": "reference", "tolerance": 1e-4, "max_iter": 1000}  # fmt: skip
    assert AlignedOptions().model_dump() == {
        "transform": "orthogonal", "steps": None, "lr": 1e-2, "alpha": None, "alpha_warmup": None, "init": None,
        "center": False, "fit": "cross", "control": "none", "solver": "fast"}  # fmt: skip


def write_config(tmp_path, protocol_options):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "t"}], "protocol_options": protocol_options}))
    return path


def test_a_bench_config_with_a_bad_protocol_option_fails_at_load_time(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_experiment_config(write_config(tmp_path, {"knn": {"chunk_size": 0}}))
    assert str(info.value) == "protocol_options: protocol 'knn': option 'chunk_size' must be a positive integer, got 0"
    with pytest.raises(ConfigError, match="^protocol_options: unknown option.*'k' for protocol 'knn'"):
        load_experiment_config(write_config(tmp_path, {"knn": {"k": 3}}))
    with pytest.raises(ConfigError, match="^protocol_options: unknown protocol 'knm'"):
        load_experiment_config(write_config(tmp_path, {"knm": {}}))
    with pytest.raises(ConfigError, match="deterministic"):
        ExperimentConfig(tasks=[{"name": "t"}], protocol_options={"ft_classifier": {"solver": "converged",
                                                                                    "head_dropout": True}})  # fmt: skip


def test_a_bench_config_keeps_the_protocol_options_as_written(tmp_path):
    written = {"ft_classifier": {"lr": 1, "epochs": 2}, "aligned": {"steps": 30}, "surgery": {"steps": 20}}
    cfg = load_experiment_config(write_config(tmp_path, written))
    assert cfg.protocol_options == written  # no defaults inserted, no conversion (lr stays the int 1)
    assert cfg.model_dump(mode="json")["protocol_options"] == written
    assert isinstance(cfg.model_dump(mode="json")["protocol_options"]["ft_classifier"]["lr"], int)
    for name in ("demo", "full"):
        assert builtin_config(name).model_dump(mode="json")["protocol_options"] == {}


def test_evaluate_checks_every_cells_options_before_any_work(tmp_path):
    missing = {"t": str(tmp_path / "nothing-here")}  # never read: the options fail first
    with pytest.raises(ConfigError, match="unknown option.*'k' for protocol 'knn'"):
        evaluate(str(tmp_path / "nope"), missing, missing, protocols=["knn"], protocol_options={"knn": {"k": 3}})
    with pytest.raises(ConfigError, match="unknown protocol 'knm'"):
        evaluate(str(tmp_path / "nope"), missing, missing, protocols=["knn"], protocol_options={"knm": {}})
    # head_dropout alone is valid, but the converged cell that ft_classifier also runs cannot use it
    with pytest.raises(ConfigError, match="deterministic"):
        evaluate(str(tmp_path / "nope"), missing, missing, protocols=["ft_classifier"],
                 protocol_options={"ft_classifier": {"head_dropout": True}})  # fmt: skip


def test_eval_option_errors_are_one_line(tmp_path):
    base = ["eval", "--merged", str(tmp_path / "m"), "--finetuned", f"t={tmp_path / 'f'}", "--data", f"t={tmp_path}"]
    for option, message in (
        ("knn.chunk_size=0", "error: protocol 'knn': option 'chunk_size' must be a positive integer, got 0"),
        ("knn.k=3", "error: unknown option(s) 'k' for protocol 'knn'; its options are: chunk_size"),
        ("aligned.fit=insample", "error: protocol 'aligned': option 'fit' must be one of cross, in_sample, got "
                                 "'insample'"),
        ("knn=3", "error: --option 'knn=3' must look like PROTOCOL.KEY=VALUE, e.g. --option knn.chunk_size=512"),
        ("magic.x=1", "error: unknown protocol 'magic'; choose one of: current, knn, aligned, ft_classifier, "
                      "linear_probe, ensemble, surgery"),
    ):  # fmt: skip
        result = runner.invoke(app, [*base, "--option", option])
        assert result.exit_code == 1, result.output
        assert [line for line in result.output.splitlines() if line.strip()] == [message]


def test_eval_options_are_parsed_and_passed_to_evaluate(monkeypatch, tmp_path):
    import mergelab.evaluation.api as api

    seen = {}

    def fake_evaluate(*args, **kwargs):
        seen.update(kwargs)
        return [ResultRow(model="merged", method="merged", params="{}", protocol="knn", task="t", seed=0, shots=5,
                          accuracy=0.5, normalized_accuracy=0.5)]  # fmt: skip

    monkeypatch.setattr(api, "evaluate", fake_evaluate)
    result = runner.invoke(app, ["eval", "--merged", "m", "--finetuned", "t=f", "--data", "t=d",
                                 "--option", "knn.chunk_size=256", "--option", "aligned.solver=adam",
                                 "--option", "aligned.alpha=0.5", "--option", "ft_classifier.full_batch=true"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["protocol_options"] == {"knn": {"chunk_size": 256}, "aligned": {"solver": "adam", "alpha": 0.5},
                                        "ft_classifier": {"full_batch": True}}  # fmt: skip


def test_protocols_command_lists_every_protocol_and_its_options():
    result = runner.invoke(app, ["protocols"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name, info in protocol_infos().items():
        header = next(line for line in lines if line.startswith(f"{name} — "))
        assert ("(transductive" in header) == info.transductive
        for key in info.options.model_fields:
            assert any(line.split()[:1] == [key] for line in lines), key
    chunk = next(line for line in lines if line.startswith("chunk_size"))
    assert chunk.split()[:3] == ["chunk_size", "int", "1024"] and "a positive integer" in chunk
    transform = next(line for line in lines if line.startswith("transform"))
    assert transform.split()[:3] == ["transform", "str", "orthogonal"] and "one of affine, linear" in transform
    assert result.output.count("no options") == 2  # current, ensemble
