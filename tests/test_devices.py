"""Devices: resolution and its errors, autocast, cache keys, and the CPU path unchanged when asked for explicitly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergelab.bench.config import load_experiment_config
from mergelab.bench.runner import run_benchmark
from mergelab.core import device as devices
from mergelab.core.device import autocast, autocast_dtype, check_precision, placed, resolve_device
from mergelab.core.errors import ConfigError
from mergelab.evaluation.devices import on_device
from mergelab.evaluation.features import FORMAT, FeatureCache, cache_file, cache_key
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.types import SplitFeatures, TaskFeatures
from mergelab.finetune.config import FinetuneConfig
from mergelab.finetune.experts import expert_cache_key, finetune_expert
from tests._hf_helpers import make_task as make_hf_task
from tests._hf_helpers import tiny_base
from tests._text_helpers import make_task, tiny_bare_base, write_task_folder

FAST = dict(epochs=1, lr=5e-3, max_length=16, batch_size=4, seed=0, warmup_ratio=0.0, head_init="random")


# ------------------------------------------------------------------------------------------------ resolution


def test_auto_is_the_cpu_on_this_machine_and_cpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == resolve_device(" CPU ") == torch.device("cpu")


def test_unknown_and_unavailable_devices_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    for name in ("gpu", "tpu", "cuda:x", "meta", ""):
        with pytest.raises(ConfigError, match=r"unknown device .*auto, cpu, cuda, cuda:N, mps"):
            resolve_device(name)
    message = r"device 'cuda' is not available here \(torch.cuda.is_available\(\) is False\); use --device cpu or auto"
    with pytest.raises(ConfigError, match=message):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="'cuda:1' is not available here"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"'mps' is not available here \(torch.backends.mps"):
        resolve_device("mps")


def test_auto_prefers_cuda_then_mps_and_checks_the_cuda_index(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2' is not available here \(2 CUDA device\(s\): cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_precision_names_autocast_and_the_cpu():
    assert autocast_dtype("fp32") is torch.float32 and autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp16") is torch.float16
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; use one of fp32, bf16, fp16"):
        autocast_dtype("fp8")
    assert check_precision(torch.device("cpu"), "fp32") == "fp32"
    with pytest.raises(ConfigError, match="precision 'bf16' needs an accelerator but the device is cpu"):
        check_precision(torch.device("cpu"), "bf16")
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    for precision in ("fp32", "bf16"):  # on the CPU nothing is autocast, whatever is asked
        with autocast("cpu", precision):
            assert not torch.is_autocast_enabled("cpu")
            out = layer(x)
        assert out.dtype is torch.float32 and torch.equal(out, layer(x))


def test_placed_moves_nothing_on_the_cpu():
    layer = torch.nn.Linear(4, 3)
    weight = layer.weight
    with placed(layer, torch.device("cpu")) as same:
        assert same is layer and layer.weight is weight and layer.weight.data.data_ptr() == weight.data_ptr()


# ------------------------------------------------------------------------------------------------ cache keys


def test_fp32_feature_keys_are_unchanged_and_other_precisions_differ():
    before = {"format": FORMAT, "encoder": "fp", "task": "th", "split": "test", "kind": "mean", "max_length": "64"}
    digest = hashlib.sha256("|".join(f"{k}={before[k]}" for k in sorted(before)).encode()).hexdigest()
    assert cache_key("fp", "th", "test", "mean", 64) == cache_key("fp", "th", "test", "mean", 64, "fp32") == before
    assert cache_file(Path("c"), cache_key("fp", "th", "test", "mean", 64)) == Path("c") / f"{digest[:40]}.safetensors"
    bf16 = cache_key("fp", "th", "test", "mean", 64, "bf16")
    assert bf16["precision"] == "bf16" and cache_file(Path("c"), bf16) != cache_file(Path("c"), before)


def test_feature_cache_refuses_low_precision_on_the_cpu(tmp_path):
    with pytest.raises(ConfigError, match="needs an accelerator"):
        FeatureCache(tmp_path, device="cpu", precision="bf16")
    with pytest.raises(ConfigError, match="unknown precision"):
        FeatureCache(tmp_path, precision="half")


def test_expert_key_has_precision_only_when_it_changes_the_weights(tmp_path):
    base, task = tiny_base(tmp_path / "base"), make_hf_task(per_class=4)
    key = expert_cache_key(base, task, **FAST)
    assert expert_cache_key(base, task, precision="fp32", **FAST) == key
    assert expert_cache_key(base, task, precision="bf16", **FAST) != key
    assert "precision" not in FinetuneConfig().model_dump()
    assert FinetuneConfig(precision="fp16").model_dump(mode="json")["precision"] == "fp16"
    with pytest.raises(ConfigError, match="needs an accelerator"):
        finetune_expert(base, task, tmp_path / "x", progress=False, device="cpu", precision="bf16", **FAST)


# ------------------------------------------------------------------------------------------ contexts on a device


def test_on_device_is_the_same_context_on_the_cpu():
    split = SplitFeatures(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    feats = TaskFeatures("t", {"test": split})
    ctx = ProtocolContext("t", feats, torch.nn.Linear(3, 2), feats, [feats])
    assert on_device(ctx, torch.device("cpu")) is ctx and on_device(ctx, None) is ctx


# ----------------------------------------------------------------------------- explicit cpu == default, end to end


def test_finetuning_on_explicit_cpu_equals_the_default(tmp_path):
    base, task = tiny_base(tmp_path / "base"), make_hf_task(per_class=4)
    a = finetune_expert(base, task, tmp_path / "a", progress=False, **FAST)
    b = finetune_expert(base, task, tmp_path / "b", progress=False, device="cpu", **FAST)
    for name in ("mergelab_head.safetensors", "model.safetensors"):
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def _bench_config(root: Path, device: str | None) -> Path:
    bare = tiny_bare_base(root)
    tasks = [write_task_folder(make_task(f"t{i}", num_classes=2 + i, per_class=8, seed=i), root / f"t{i}") for i in range(2)]
    config = {
        "base": str(bare), "tasks": [{"name": f"t{i}", "path": str(p)} for i, p in enumerate(tasks)],
        "data": {"fewshot_pool_per_class": 4}, "finetune": {"epochs": 2, "lr": 3.0e-3, "max_length": 16, "batch_size": 8},
        "methods": [{"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}},
                    {"name": "regmean", "params": {"num_examples": 8}},
                    {"name": "fisher", "params": {"num_examples": 4, "label_mode": "sampled"}},
                    {"name": "adamerging", "params": {"steps": 2, "num_examples": 8, "batch_size": 4}},
                    {"name": "tall_consensus", "params": {"lambdas": [0.3, 0.6]}}],
        "multitask": True,
        "neulig": {"steps": 3, "train_examples": 8, "test_examples": 8, "eval_batch_size": 4, "batch_size": 8},
        "protocols": ["current", "knn", "ft_classifier", "ensemble"],
        "protocol_options": {"ft_classifier": {"epochs": 2}}, "shots": [1], "seeds": 1, "threads": 1,
        **({"device": device} if device else {}),
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_bench_on_explicit_cpu_equals_the_default(tmp_path):
    """Fine-tuning, features, protocols, data-dependent merges, NeuLig and MTL: byte-identical results.csv."""
    runs = {}
    for device in (None, "cpu"):
        root = tmp_path / (device or "default")
        cfg = load_experiment_config(_bench_config(root, device))
        assert cfg.device == device and "device" not in cfg.model_dump(mode="json")
        run_benchmark(cfg, root / "run", root / "cache", log=lambda m: None, report=False)
        runs[device] = (root / "run" / "results.csv").read_bytes()
    assert runs[None] == runs["cpu"] and runs[None].count(b"\n") > 20
