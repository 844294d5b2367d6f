"""Encoder + head split of HF classifiers, label checks, the feature cache, and expert fine-tuning."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from mergelab.core.errors import CheckpointError, DataError
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.finetune.experts import get_or_train_expert
from mergelab.io.fingerprint import checkpoint_fingerprint, state_dict_fingerprint
from mergelab.models.hf import load_encoder, load_task_model
from mergelab.models.task_model import TaskModel
from tests._text_helpers import make_task, tiny_classifier


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_current_eval_of_a_finetuned_model_reproduces_its_own_predictions(tmp_path, kind):
    path = tiny_classifier(kind, tmp_path / kind)
    task = make_task("t", num_classes=3)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    test = task.splits["test"]
    with torch.no_grad():
        own = model(**tokenizer(test.texts, padding=True, return_tensors="pt")).logits
    task_model = load_task_model(path, label_names=task.label_names)
    feats = FeatureCache(tmp_path / "cache", progress=False).features(
        task_model.encoder, checkpoint_fingerprint(path), task, splits=("test",), batch_size=5)
    with torch.no_grad():
        logits = task_model.head(feats.split("test").features)
    torch.testing.assert_close(logits, own, atol=1e-5, rtol=1e-4)
    outcome = run_protocol("current", ProtocolContext("t", feats, task_model.head))
    assert torch.equal(outcome.predictions, own.argmax(1))


def test_label_mismatch_is_a_clear_error(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m", num_labels=3)
    with pytest.raises(DataError, match="2 classes|3 classes"):
        load_task_model(path, label_names=["a", "b"])
    with pytest.raises(DataError, match="differ"):
        load_task_model(path, label_names=["class0", "class2", "class1"])


def test_feature_cache_hit_does_no_forward_pass(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m")
    task = make_task("t")
    encoder = load_task_model(path).encoder
    calls = []
    handle = encoder.model.register_forward_hook(lambda *a: calls.append(1))
    cache = FeatureCache(tmp_path / "cache", progress=False)
    fp = checkpoint_fingerprint(path)
    first = cache.features(encoder, fp, task, splits=("train", "test"))
    assert calls and cache.computed == 2
    calls.clear()
    again = FeatureCache(tmp_path / "cache", progress=False).features(encoder, fp, task, splits=("train", "test"))
    assert calls == []  # every protocol, seed and shot count reads these; no encoder pass
    assert torch.equal(first.split("test").features, again.split("test").features)
    # a different max length, task or weights is a different key
    FeatureCache(tmp_path / "cache", progress=False).features(encoder, fp, task, splits=("test",), max_length=5)
    assert calls
    handle.remove()


def test_corrupt_cache_file_is_recomputed(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m")
    task = make_task("t")
    encoder = load_task_model(path).encoder
    cache = FeatureCache(tmp_path / "cache", progress=False)
    good = cache.features(encoder, "fp", task, splits=("test",))
    for file in (tmp_path / "cache").glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:50])
    again = FeatureCache(tmp_path / "cache", progress=False)
    with pytest.warns(UserWarning, match="unreadable"):
        recomputed = again.features(encoder, "fp", task, splits=("test",))
    assert torch.equal(recomputed.split("test").features, good.split("test").features)
    assert again.computed == 1


def test_load_encoder_from_state_dict_with_or_without_prefix(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m")
    task = make_task("t")
    full = AutoModelForSequenceClassification.from_pretrained(path).state_dict()
    bare = {k[len("bert."):]: v for k, v in full.items() if k.startswith("bert.")}
    a = load_encoder(full, path).encode_texts(task.splits["test"].texts)
    b = load_encoder(bare, path).encode_texts(task.splits["test"].texts)
    c = load_encoder(path, path).encode_texts(task.splits["test"].texts)
    assert torch.equal(a, b) and torch.allclose(a, c)
    with pytest.raises(CheckpointError, match="lacks encoder tensors"):
        load_encoder({k: v for k, v in bare.items() if "pooler" not in k}, path)


def test_fingerprints_track_content(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert state_dict_fingerprint(sd) == state_dict_fingerprint(dict(reversed(list(sd.items()))))
    assert state_dict_fingerprint(sd) != state_dict_fingerprint({"a": torch.ones(2) * 2, "b": torch.zeros(3)})
    p1, p2 = tiny_classifier("bert", tmp_path / "a", seed=0), tiny_classifier("bert", tmp_path / "b", seed=1)
    assert checkpoint_fingerprint(p1) != checkpoint_fingerprint(p2)


def test_task_content_hash_is_stable_and_sensitive():
    a, b = make_task("t", seed=0), make_task("t", seed=0)
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != make_task("t", seed=1).content_hash()


def test_user_torch_modules_are_task_models():
    head = torch.nn.Linear(4, 3)
    model = TaskModel.from_modules(torch.nn.Linear(5, 4), head, ["a", "b", "c"])
    assert model.head is head
    with pytest.raises(DataError, match="3 outputs"):
        TaskModel.from_modules(torch.nn.Linear(5, 4), head, ["a", "b"])


def test_expert_finetuning_learns_and_is_cached(tmp_path):
    base = tiny_classifier("bert", tmp_path / "base")
    bare = tmp_path / "bare"
    AutoModel.from_pretrained(base).save_pretrained(bare)  # a bare encoder, like all-MiniLM-L6-v2
    AutoTokenizer.from_pretrained(base).save_pretrained(bare)
    task = make_task("t", num_classes=3, per_class=16)
    hyper = dict(epochs=6, lr=5e-3, max_length=16, batch_size=8, seed=0, train_size=None, weight_decay=0.0)
    path = get_or_train_expert(tmp_path / "experts", bare, task, progress=False, **hyper)
    import json

    log = json.loads((path / "mergelab_training.json").read_text())
    assert log["last_loss"] < log["first_loss"]
    model = load_task_model(path, label_names=task.label_names)
    feats = FeatureCache(tmp_path / "c", progress=False).features(model.encoder, "x", task, splits=("test",))
    assert run_protocol("current", ProtocolContext("t", feats, model.head)).accuracy > 0.6
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again = get_or_train_expert(tmp_path / "experts", bare, task, progress=False, **hyper)
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert not [p for p in (tmp_path / "experts").iterdir() if p.name.startswith(".")]  # no temp leftovers
