"""A LoRA classifier adapter given as a benchmark expert: materialised once into the full classifier PEFT defines
(``merge_and_unload()``), with the task's labels; one clear error for an adapter without a head or of another width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.models import lora
from mergelab.models.loading import load_task_model
from tests._hf_helpers import tiny_base

pytest.importorskip("peft")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

LABELS = ["neg", "neu", "pos"]


def make_adapter(base: Path, folder: Path, num_labels: int = 3, seed: int = 1, **lora_options) -> dict:
    """A LoRA SEQ_CLS adapter on ``base`` with random factors and head, saved; returns PEFT's merged state dict."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    options = {"task_type": TaskType.SEQ_CLS, **lora_options}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("lora-expert") / "base")


def test_materialised_expert_is_peft_merge_and_unload_with_the_tasks_labels(base, tmp_path, monkeypatch):
    expected = make_adapter(base, tmp_path / "adapter")
    folder = lora.materialise_lora_classifier("t", tmp_path / "adapter", base, LABELS, tmp_path / "experts")
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) <= set(expected) and any(k.startswith("classifier.") for k in saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    model = load_task_model(folder, label_names=LABELS)  # the expert loads as any classifier, labels checked
    assert model.head is not None
    monkeypatch.setattr(lora, "apply_adapter", lambda *a: pytest.fail("materialised twice"))
    assert lora.materialise_lora_classifier("t", tmp_path / "adapter", base, LABELS, tmp_path / "experts") == folder


def test_an_adapter_without_its_head_is_one_clear_error(base, tmp_path):
    make_adapter(base, tmp_path / "bare", task_type=None)  # no SEQ_CLS: the head is not saved
    with pytest.raises(ConfigError, match=r"saves no classification head \(classifier\).*task_type='SEQ_CLS'") as info:
        lora.materialise_lora_classifier("t", tmp_path / "bare", base, LABELS, tmp_path / "experts")
    assert "\n" not in str(info.value) and not (tmp_path / "experts").exists()


def test_an_adapter_for_another_label_count_is_one_clear_error(base, tmp_path):
    make_adapter(base, tmp_path / "two", num_labels=2)
    with pytest.raises(CheckpointError, match=r"does not fit the base with the task's 3 labels") as info:
        lora.materialise_lora_classifier("t", tmp_path / "two", base, LABELS, tmp_path / "experts")
    assert "\n" not in str(info.value)


def test_an_adapter_of_another_base_is_refused(base, tmp_path):
    make_adapter(base, tmp_path / "adapter")
    other = tiny_base(tmp_path / "other", seed=5)
    with pytest.raises(CheckpointError, match=r"was trained on .* but the base given is .*a different checkpoint"):
        lora.materialise_lora_classifier("t", tmp_path / "adapter", other, LABELS, tmp_path / "experts")


def test_a_bench_on_lora_adapters_gives_the_rows_of_their_materialised_models(tmp_path, monkeypatch):
    import pandas as pd

    from mergelab.bench import pool as pool_module
    from mergelab.bench.config import ExperimentConfig
    from mergelab.bench.runner import run_benchmark
    from tests._text_helpers import make_task, tiny_bare_base, write_task_folder

    monkeypatch.setattr(pool_module, "get_or_train_expert", lambda *a, **k: pytest.fail("an expert was fine-tuned"))
    bare = tiny_bare_base(tmp_path)
    tasks = {f"t{i}": make_task(f"t{i}", num_classes=2 + i, per_class=6, seed=i) for i in range(3)}
    adapters = {}
    for i, (name, task) in enumerate(tasks.items()):
        write_task_folder(task, tmp_path / name)
        make_adapter(bare, tmp_path / f"lora-{name}", num_labels=len(task.label_names), seed=10 + i)
        adapters[name] = str(tmp_path / f"lora-{name}")
    config = {"base": str(bare), "tasks": [{"name": n, "path": str(tmp_path / n)} for n in tasks],
              "data": {"fewshot_pool_per_class": 3}, "finetune": {"max_length": 16},
              "methods": [{"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}}], "protocols": ["current", "knn"],
              "shots": [1], "seeds": 2, "threads": 1}  # fmt: skip
    run_benchmark(ExperimentConfig.model_validate({**config, "experts": adapters}), tmp_path / "run", tmp_path / "cache",
                  log=lambda m: None, report=False)  # fmt: skip
    materialised = {n: next((tmp_path / "cache" / "experts").glob(f"lora-{n}-*")) for n in tasks}
    full = {n: str(path) for n, path in materialised.items()}
    run_benchmark(ExperimentConfig.model_validate({**config, "experts": full}), tmp_path / "run-full",
                  tmp_path / "cache-full", log=lambda m: None, report=False)  # fmt: skip
    mine, theirs = (pd.read_csv(tmp_path / r / "results.csv") for r in ("run", "run-full"))
    assert len(mine) > 0 and {"finetuned", "merged"} <= set(mine["model"])
    pd.testing.assert_frame_equal(mine, theirs)  # same content, same keys: the adapters are those models
