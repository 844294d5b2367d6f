"""The bench on image tasks: a tiny random EfficientNet-Lite base, synthetic image tasks, the whole run and a rerun."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("efficientnet_lite_pytorch")

import mergelab.finetune.images as image_finetune  # noqa: E402
from mergelab.bench.config import builtin_config, load_experiment_config  # noqa: E402
from mergelab.bench.pool import load_expert_pool  # noqa: E402
from mergelab.bench.runner import run_benchmark  # noqa: E402
from mergelab.bench.store import ResultStore  # noqa: E402
from mergelab.core.errors import ConfigError  # noqa: E402
from mergelab.models.efficientnet import EfficientNetEncoder, family_config, save_efficientnet  # noqa: E402

COUNTS = {"train": 8, "validation": 3, "test": 4}


def write_pattern_task(root, seed: int, classes=3):
    """Class c: a bright band at a class-specific position (shifted per task), plus noise; 16×16 grayscale PNGs."""
    rng = np.random.default_rng(seed)
    for split, per_class in COUNTS.items():
        for c in range(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 60, (16, 16)).astype(np.uint8)
                start = (4 * c + seed) % 12
                pixels[start : start + 4] = 230
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(path)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    base = save_efficientnet(root / "base", EfficientNetEncoder(family_config(image_size=32)).eval())
    config = {
        "base": str(base),
        "tasks": [{"name": "bands", "path": str(write_pattern_task(root / "bands", 0))},
                  {"name": "shifted", "path": str(write_pattern_task(root / "shifted", 2))}],
        "data": {"fewshot_pool_per_class": 2},
        "finetune": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "head_init": "probe"},
        "methods": [{"name": "weight_average"}, {"name": "task_arithmetic", "grid": {"scale": [0.5, 1.0]}},
                    {"name": "cart", "params": {"lowrank_patterns": [r"_project_conv\.weight$"]},
                     "grid": {"rank_ratio": [0.5]}}],
        "protocols": ["current", "knn", "ft_classifier"],
        "shots": [1], "seeds": 1, "batch_size": 16,
    }  # fmt: skip
    (root / "vision.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def finished(setup):
    cfg = load_experiment_config(setup / "vision.yaml")
    report = run_benchmark(cfg, setup / "run", setup / "cache", log=lambda m: None)
    return report


def test_image_run_trains_merges_evaluates_and_reports(setup, finished):
    assert finished.is_file() and "bands" in finished.read_text()
    with ResultStore(setup / "run" / "results.sqlite") as store:
        rows = store.rows("test")
        experts = store.get_meta("experts")
        chosen = store.get_meta("chosen")
    merged = {(r["method"], r["protocol"], r["task"]) for r in rows if r["model"] == "merged"}
    for method in ("weight_average", "task_arithmetic", "cart"):
        for protocol in ("current", "knn", "ft_classifier"):
            assert {(method, protocol, "bands"), (method, protocol, "shifted")} <= merged
    assert {r["task"] for r in rows if r["model"] == "finetuned"} == {"bands", "shifted"}
    assert set(experts) == {"bands", "shifted"} and all(v["probe_accuracy"] is not None for v in experts.values())
    assert chosen["task_arithmetic"]["scale"] in (0.5, 1.0)
    folders = sorted((setup / "cache" / "experts").iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["bands", "shifted"]
    config = json.loads((folders[0] / "config.json").read_text())
    assert config["model_type"] == "efficientnet_lite" and config["label_names"] == ["class0", "class1", "class2"]
    log = json.loads((folders[0] / "mergelab_training.json").read_text())
    assert log["modality"] == "image" and log["steps"] == len(log["losses"]) == 6 and log["head_shift"] > 0
    expert, base = (load_file(str(f / "model.safetensors")) for f in (folders[0], setup / "base"))
    assert not torch.equal(expert["_blocks.3._project_conv.weight"], base["_blocks.3._project_conv.weight"])
    assert torch.equal(expert["_bn0.running_mean"], base["_bn0.running_mean"])  # BatchNorm statistics frozen


def test_rerun_reuses_experts_and_features(setup, finished, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("an expert was trained again")

    monkeypatch.setattr(image_finetune, "finetune_image_expert", no_training)
    cfg = load_experiment_config(setup / "vision.yaml")
    run_benchmark(cfg, setup / "rerun", setup / "cache", log=lambda m: None, report=False)
    with ResultStore(setup / "run" / "results.sqlite") as first, ResultStore(setup / "rerun" / "results.sqlite") as second:
        one = sorted((r["method"], r["protocol"], r["task"], r["accuracy"]) for r in first.rows("test"))
        two = sorted((r["method"], r["protocol"], r["task"], r["accuracy"]) for r in second.rows("test"))
    assert one == two


def test_a_text_task_on_an_image_base_is_refused_before_training(setup, tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.csv").write_text("text,label\nhello,a\nworld,b\n")
    cfg = load_experiment_config(setup / "vision.yaml").model_copy(update={
        "tasks": [*load_experiment_config(setup / "vision.yaml").tasks[:1],
                  load_experiment_config(setup / "vision.yaml").tasks[0].model_copy(update={"name": "t", "path": str(folder)})]
    })  # fmt: skip
    with pytest.raises(ConfigError, match="reads image"):
        load_expert_pool(cfg, tmp_path / "cache")


def test_vision_is_a_builtin_config():
    cfg = builtin_config("vision")
    assert cfg.base == "efficientnet-lite0" and [t.name for t in cfg.tasks] == ["mnist", "fashion_mnist", "digits"]
    assert {"weight_average", "task_arithmetic", "ties", "cart"} <= {m.name for m in cfg.methods}
    assert {"current", "knn", "ft_classifier", "aligned"} <= set(cfg.protocols)
