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
