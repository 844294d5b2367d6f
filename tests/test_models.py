"""Task models: HF classifiers split into encoder + head, label checks, base encoders, fingerprints."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification

from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.io.fingerprint import checkpoint_fingerprint, state_dict_fingerprint
from mergelab.models.hf import (
    architecture,
    classifier_head_state,
    head_from_state,
    label_names_of,
    load_encoder,
    load_task_model,
)
from mergelab.models.task_model import TaskModel, check_label_names
from tests._hf_helpers import KINDS, make_task, own_logits, tiny_base, tiny_classifier


@pytest.mark.parametrize("kind", KINDS)
def test_features_then_head_reproduce_the_finetuned_models_own_logits(tmp_path, kind):
    path = tiny_classifier(kind, tmp_path / kind)
    texts = make_task(test_per_class=6).splits["test"].texts
    own = own_logits(path, texts)
    model = load_task_model(path, label_names=["class0", "class1", "class2"])
    features = model.encoder.encode_texts(texts, batch_size=4)  # length-sorted batches, different padding
    with torch.no_grad():
        logits = model.head(features)
    torch.testing.assert_close(logits, own, atol=1e-5, rtol=1e-4)
    assert torch.equal(logits.argmax(1), own.argmax(1))
    # the in-memory merged-encoder path (the classifier's own state dict, prefix and head included) agrees
    state = AutoModelForSequenceClassification.from_pretrained(path).state_dict()
    torch.testing.assert_close(load_encoder(state, path).encode_texts(texts), features, atol=1e-5, rtol=1e-4)
    # a head re-trained by a protocol has no dropout: train mode gives the same logits
    model.head.train()
    with torch.no_grad():
        torch.testing.assert_close(model.head(features), logits)


def test_bert_feature_is_the_pooler_output_and_the_head_is_the_classifier(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m")
    model = load_task_model(path)
    assert model.encoder.pooling == "pooler" and isinstance(model.head, torch.nn.Linear)
    assert "pooler.dense.weight" in model.encoder.model.state_dict()  # pooler = encoder weights, merged
    assert model.label_names == ["class0", "class1", "class2"]
    assert load_task_model(tiny_classifier("distilbert", tmp_path / "d")).encoder.pooling == "cls"


def test_label_mismatch_is_a_data_error_naming_both_lists(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m", label_names=["neg", "neu", "pos"])
    with pytest.raises(DataError, match=r"3 classes \['neg', 'neu', 'pos'\].*2 classes \['neg', 'pos'\]"):
        load_task_model(path, label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"differ.*'neu' vs 'pos'"):
        load_task_model(path, label_names=["neg", "pos", "neu"])
    assert load_task_model(path, label_names=["neg", "neu", "pos"]).label_names == ["neg", "neu", "pos"]


def test_generic_label_names_are_ignored_but_counts_still_checked():
    check_label_names(["LABEL_0", "LABEL_1"], ["neg", "pos"], "x")  # HF default names carry no meaning
    check_label_names(["neg", "pos"], ["0", "1"], "x")  # bare indices from a numeric label column
    check_label_names(["1", "2", "3"], ["1", "2", "3"], "x")
    with pytest.raises(DataError, match="differ"):
        check_label_names(["1", "2", "3"], ["2", "1", "3"], "x")  # shifted star ratings are names, not indices
    with pytest.raises(DataError, match="2 classes"):
        check_label_names(["LABEL_0", "LABEL_1"], ["a", "b", "c"], "x")
    with pytest.raises(DataError, match="differ"):
        check_label_names(["b", "a"], ["a", "b"], "x")
    with pytest.raises(DataError, match="differ"):
        check_label_names(["LABEL_1", "LABEL_0"], ["a", "b"], "x")  # LABEL_1 at class 0 is not a placeholder


def test_load_encoder_from_state_dict_with_and_without_prefix_and_from_a_base_folder(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m")
    texts = make_task().splits["test"].texts
    full = AutoModelForSequenceClassification.from_pretrained(path).state_dict()
    bare = {k[len("bert.") :]: v for k, v in full.items() if k.startswith("bert.")}
    a = load_encoder(full, path).encode_texts(texts)
    b = load_encoder(bare, path).encode_texts(texts)
    assert torch.equal(a, b)
    base_dir = tmp_path / "base"  # the same encoder saved in base layout, loaded from disk
    AutoModel.from_pretrained(path).save_pretrained(base_dir)
    torch.testing.assert_close(load_encoder(base_dir, path).encode_texts(texts), a)
    half = {k: v.half() for k, v in bare.items()}  # dtype converted to float32
    assert load_encoder(half, path).model.embeddings.word_embeddings.weight.dtype == torch.float32


def test_load_encoder_refuses_incomplete_or_mismatched_weights(tmp_path):
    path = tiny_classifier("bert", tmp_path / "m")
    bare = {k[5:]: v for k, v in AutoModelForSequenceClassification.from_pretrained(path).state_dict().items()
            if k.startswith("bert.")}  # fmt: skip
    with pytest.raises(CheckpointError, match="lacks encoder tensors.*pooler"):
        load_encoder({k: v for k, v in bare.items() if "pooler" not in k}, path)
    wrong = dict(bare, **{"pooler.dense.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match="shape"):
        load_encoder(wrong, path)
    with pytest.raises(ConfigError, match="config_source"):
        load_encoder(bare)
    no_pooler = tmp_path / "nopool"  # a BERT base saved without its pooler would get a random one: refused
    AutoModel.from_pretrained(path, add_pooling_layer=False).save_pretrained(no_pooler)
    with pytest.raises(CheckpointError, match="pooler"):
        load_encoder(no_pooler, path)


def test_load_encoder_reads_a_weights_only_folder_and_the_real_base_layout(tmp_path):
    base = tiny_base(tmp_path / "base")  # int64 position_ids in the file, like all-MiniLM-L6-v2
    texts = ["alpha beta", "cat dog fish"]
    reference = load_encoder(base).encode_texts(texts)
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    shutil.copy(base / "model.safetensors", weights_only / "model.safetensors")
    torch.testing.assert_close(load_encoder(weights_only, base).encode_texts(texts), reference)
    state = load_file(str(base / "model.safetensors"))
    assert "embeddings.position_ids" in state
    torch.testing.assert_close(load_encoder(state, base).encode_texts(texts), reference)


def test_load_task_model_refuses_a_base_model_and_unsupported_types(tmp_path):
    base = tiny_base(tmp_path / "base")
    with pytest.raises(CheckpointError, match="not a complete fine-tuned classifier"):
        load_task_model(base)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_task_model(tmp_path)
    with pytest.raises(CheckpointError, match="'gpt2' is not supported.*bert.*TaskModel.from_modules"):
        architecture("gpt2")
    odd = tmp_path / "gpt"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2}')
    with pytest.raises(CheckpointError, match="no loadable classifier weights"):
        load_task_model(odd)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_head_state_round_trip(tmp_path, kind):
    path = tiny_classifier(kind, tmp_path / kind)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    state = classifier_head_state(model)
    head = head_from_state(model.config, state, ["class0", "class1", "class2"])
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), load_task_model(path).head(x))
    with pytest.raises(CheckpointError, match="do not fit"):
        head_from_state(model.config, state, ["a", "b"])
    assert label_names_of(path) == ["class0", "class1", "class2"]


def test_user_torch_modules_are_task_models():
    torch.manual_seed(0)
    encoder, head = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh()), torch.nn.Linear(4, 3)
    model = TaskModel.from_modules(encoder, head, ["a", "b", "c"])
    x = torch.randn(6, 5)
    torch.testing.assert_close(model.logits(x), head(encoder(x)))
    assert model.head is head and model.num_classes == 3 and not model.encoder.training
    with pytest.raises(DataError, match="3 outputs but 2 label names"):
        TaskModel.from_modules(encoder, head, ["a", "b"])
    deep = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(DataError, match="2 outputs"):
        TaskModel.from_modules(encoder, deep, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="nn.Module"):
        TaskModel.from_modules(lambda x: x, head, ["a", "b", "c"])


def test_state_dict_fingerprint_hand_checked_and_sensitive():
    t = torch.tensor([1.0, -2.0])
    expected = hashlib.sha256(b"w|torch.float32|(2,)|" + t.numpy().tobytes()).hexdigest()
    assert state_dict_fingerprint({"w": t}) == expected
    sd = {"a": torch.ones(2), "b": torch.zeros(3)}
    fp = state_dict_fingerprint(sd)
    assert fp == state_dict_fingerprint({"b": torch.zeros(3), "a": torch.ones(2)})  # order-free
    assert fp != state_dict_fingerprint({"a": torch.ones(2) * 2, "b": torch.zeros(3)})  # values
    assert fp != state_dict_fingerprint({"a": torch.ones(2).double(), "b": torch.zeros(3)})  # dtype
    assert fp != state_dict_fingerprint({"a": torch.ones(1, 2), "b": torch.zeros(3)})  # shape
    assert fp != state_dict_fingerprint({"c": torch.ones(2), "b": torch.zeros(3)})  # names


def test_checkpoint_fingerprint_tracks_weights_and_config_not_location(tmp_path):
    a = tiny_classifier("bert", tmp_path / "a", seed=0)
    fp = checkpoint_fingerprint(a)
    copy = tmp_path / "elsewhere" / "a"
    shutil.copytree(a, copy)
    (copy / ".cache").mkdir()
    (copy / ".cache" / "x.safetensors").write_bytes(b"junk")  # hidden files do not count
    assert checkpoint_fingerprint(copy) == fp
    assert checkpoint_fingerprint(tiny_classifier("bert", tmp_path / "b", seed=1)) != fp
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace('"class0"', '"zero"'))
    assert checkpoint_fingerprint(copy) != fp
    single = checkpoint_fingerprint(a / "model.safetensors")  # a single weights file is fingerprinted by itself
    state = load_file(str(a / "model.safetensors"))
    state["classifier.bias"] = state["classifier.bias"] + 1e-3
    save_file(state, str(tmp_path / "changed.safetensors"))
    assert checkpoint_fingerprint(tmp_path / "changed.safetensors") != single
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_fingerprint(tmp_path / "missing")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "w.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no weight files"):
        checkpoint_fingerprint(tmp_path / "empty")


def test_load_encoder_with_a_config_object_and_a_separate_tokenizer(tmp_path):
    from transformers import AutoConfig

    path = tiny_classifier("roberta", tmp_path / "r")
    full = AutoModelForSequenceClassification.from_pretrained(path).state_dict()
    texts = ["alpha beta gamma", "red"]
    reference = load_task_model(path).encoder.encode_texts(texts)
    config = AutoConfig.from_pretrained(path)
    torch.testing.assert_close(load_encoder(full, config, tokenizer=path).encode_texts(texts), reference)
    with pytest.raises(ConfigError, match="tokenizer="):
        load_encoder(full, config)


def test_encode_texts_caps_max_length_at_the_position_embeddings_and_checks_inputs(tmp_path):
    encoder = load_task_model(tiny_classifier("roberta", tmp_path / "r")).encoder  # 40 positions, offset by 1
    long_text = " ".join(["alpha", "beta", "gamma"] * 30)
    assert encoder.max_length(1000) == 39  # positions padding_idx + 1 .. padding_idx + L must be < 40
    torch.testing.assert_close(encoder.encode_texts([long_text], max_length=1000),
                               encoder.encode_texts([long_text], max_length=39))  # fmt: skip
    assert encoder.encode_texts([]).shape == (0, 32)
    with pytest.raises(ConfigError, match="max_length"):
        encoder.encode_texts(["alpha"], max_length=1)
    with pytest.raises(ConfigError, match="batch_size"):
        encoder.encode_texts(["alpha"], batch_size=0)
