"""Pooled classifiers (mean pooling + Linear), the frozen-encoder probe, and the experts' upper-bound checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mergelab.bench.expert_checks import check_experts, expert_verdict, majority_rate, warnings_for
from mergelab.core.errors import CheckpointError, DataError
from mergelab.evaluation.types import SplitFeatures, TaskFeatures
from mergelab.finetune.probe import MISSING_CLASS_MARGIN, fit_linear_probe, linear_from_logistic
from mergelab.models.hf import load_encoder, load_task_model, pool, save_pooled_classifier
from tests._hf_helpers import tiny_base


def test_mean_pooling_averages_only_the_real_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = pool(SimpleNamespace(last_hidden_state=hidden), mask, "mean")
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [7.0, 8.0]]))  # hand-computed; padding ignored
    torch.testing.assert_close(pool(SimpleNamespace(last_hidden_state=hidden), None, "cls"), hidden[:, 0])


def test_a_mean_pooled_feature_does_not_depend_on_the_padding(tmp_path):
    encoder = load_encoder(tiny_base(tmp_path / "base"), pooling="mean")
    short, long = "alpha beta", "gamma delta red green blue cat dog fish"
    alone = encoder.encode_texts([short])
    padded = encoder.encode_texts([short, long], batch_size=2)  # padded to the long text's length
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def test_a_pooled_classifier_round_trips_and_reproduces_its_logits(tmp_path):
    base = tiny_base(tmp_path / "base")
    encoder = load_encoder(base, pooling="mean")
    head = torch.nn.Linear(32, 3)
    save_pooled_classifier(tmp_path / "expert", encoder, head, ["a", "b", "c"])
    model = load_task_model(tmp_path / "expert", label_names=["a", "b", "c"])
    texts = ["alpha beta", "red green blue cat"]
    with torch.no_grad():
        expected = head(encoder.encode_texts(texts))
        torch.testing.assert_close(model.head(model.encoder.encode_texts(texts)), expected)
    with pytest.raises(DataError, match="differ"):
        load_task_model(tmp_path / "expert", label_names=["b", "a", "c"])
    (tmp_path / "expert" / "mergelab_head.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_task_model(tmp_path / "expert")


def test_a_pooled_head_of_another_width_is_refused(tmp_path):
    base = tiny_base(tmp_path / "base")
    save_pooled_classifier(tmp_path / "expert", load_encoder(base, pooling="mean"), torch.nn.Linear(32, 2), ["a", "b"])
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 16), "bias": torch.zeros(2)}, str(tmp_path / "expert" / "mergelab_head.safetensors"))
    with pytest.raises(CheckpointError, match="reads 16 features but the encoder gives 32"):
        load_task_model(tmp_path / "expert")


def test_binary_probe_head_has_sklearns_probabilities_and_a_missing_class_never_wins():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    head = linear_from_logistic(model.coef_, model.intercept_, [0, 1], 2)
    with torch.no_grad():
        probs = torch.softmax(head(torch.from_numpy(x).float()), dim=1).numpy()
    np.testing.assert_allclose(probs, model.predict_proba(x), atol=1e-5)
    three = linear_from_logistic(np.eye(2), np.array([0.5, -1.0]), [0, 2], 3)  # class 1 never seen
    assert three.bias[1].item() == pytest.approx(-1.0 - MISSING_CLASS_MARGIN)
    assert torch.equal(three.weight[1], torch.zeros(2))


def test_the_probe_chooses_its_strength_by_cross_validation_on_train_only():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(60, 5))).float()
    labels = (features[:, 1] > 0).long().tolist()
    head, info = fit_linear_probe(features, labels, 2, seed=0)
    assert info["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and info["folds"] == 3 and info["examples"] == 60
    assert info["train_accuracy"] > 0.9 and set(info["cv_accuracy"]) == {0.01, 0.1, 1.0, 10.0, 100.0}
    assert info["C"] == max(info["cv_accuracy"], key=lambda c: (info["cv_accuracy"][c], -c))
    with pytest.raises(DataError, match="at least 2 classes"):
        fit_linear_probe(features, [0] * 60, 2, seed=0)


def test_majority_rate_and_verdicts_are_hand_checked():
    assert majority_rate(torch.tensor([0, 1, 1, 2, 1])) == 3 / 5
    good = expert_verdict("t", 0.9, 0.8, 0.5, {"losses": [1.0, 0.5], "head_shift": 0.2, "steps": 2})
    assert not good["below_probe"] and not good["below_majority"] and good["losses"] == [1.0, 0.5]
    tied = expert_verdict("t", 0.8, 0.8, 0.5, {})
    assert tied["below_probe"]  # equal is not beating the bar
    weak = expert_verdict("t", 0.4, None, 0.5, {})
    assert not weak["below_probe"] and weak["below_majority"]
    lines = warnings_for({"t": tied, "u": weak})
    assert len(lines) == 2 and "'t'" in lines[0] and "probe" in lines[0] and "majority" in lines[1]


def test_check_experts_scores_the_saved_probe_on_frozen_features(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "expert"
    folder.mkdir()
    save_file({"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "bias": torch.zeros(2)},
              str(folder / "mergelab_probe.safetensors"))  # fmt: skip
    (folder / "mergelab_training.json").write_text(json.dumps({"losses": [0.7, 0.3], "head_shift": 0.1}))
    features = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])  # probe predicts 0, 1, 0, 0
    pretrained = {"t": TaskFeatures("t", {"test": SplitFeatures(features, torch.tensor([0, 1, 1, 1]))})}
    expert = SimpleNamespace(path=folder, head=torch.nn.Linear(2, 2))
    verdicts = check_experts({"t": expert}, pretrained, {"t": 0.75})
    assert verdicts["t"]["probe_accuracy"] == 0.5 and verdicts["t"]["majority_rate"] == 0.75
    assert verdicts["t"]["below_majority"] and not verdicts["t"]["below_probe"]
