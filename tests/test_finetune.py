"""Fine-tuning task experts (cached by content, saved atomically) and the multi-task baseline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from mergelab.bench.config import ExperimentConfig, demo_config
from mergelab.core.errors import CheckpointError, ConfigError, DataError, OutputError
from mergelab.core.rng import derive_seed
from mergelab.evaluation.features import FeatureCache
from mergelab.finetune import experts
from mergelab.finetune.config import FinetuneConfig
from mergelab.finetune.experts import (
    batch_schedule,
    decay_groups,
    expert_cache_key,
    finetune_expert,
    finetune_multitask,
    get_or_train_expert,
    get_or_train_multitask,
    load_multitask,
    load_probe,
    multitask_cache_key,
    random_linear_head,
    round_robin,
)
from mergelab.models.hf import label_names_of, load_encoder, load_task_model
from tests._hf_helpers import Split, Task, make_task, tiny_base

FAST = dict(epochs=6, lr=1e-2, max_length=16, batch_size=8, seed=0, weight_decay=0.0, warmup_ratio=0.0,
            head_init="random")


@pytest.fixture
def base(tmp_path):
    return tiny_base(tmp_path / "base")


def accuracy(model, task, split="test"):  # noqa: ANN001, ANN201
    features = model.encoder.encode_texts(task.splits[split].texts)
    with torch.no_grad():
        predictions = model.head(features).argmax(1)
    return (predictions == torch.tensor(task.splits[split].labels)).float().mean().item()


def test_batch_schedule_and_round_robin_hand_checked():
    batches = batch_schedule(5, 2, epochs=2, seed=0)
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(batches[:3], [])) == list(range(5)) and sorted(sum(batches[3:], [])) == list(range(5))
    assert batches == batch_schedule(5, 2, epochs=2, seed=0) and batches != batch_schedule(5, 2, epochs=2, seed=1)
    assert len(batch_schedule(10, 2, epochs=0.5, seed=0)) == 3  # ceil(0.5 × 5)
    assert round_robin([[[0], [1], [2]], [[9]]]) == [(0, [0]), (1, [9]), (0, [1]), (0, [2])]
    model = torch.nn.Module()
    model.dense, model.LayerNorm = torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["params"] == [model.dense.weight] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_finetuning_lowers_the_loss_and_saves_a_loadable_classifier(tmp_path, base):
    task = make_task(per_class=12)
    rng_state = torch.get_rng_state()
    threads = torch.get_num_threads()
    out = finetune_expert(base, task, tmp_path / "expert", threads=1, progress=False, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    assert torch.get_num_threads() == threads  # and its thread setting restored
    log = json.loads((out / "mergelab_training.json").read_text())
    assert log["steps"] == 6 * 5 and log["threads"] == 1 and log["examples_per_second"] > 0
    first, last = sum(log["losses"][:5]) / 5, sum(log["losses"][-5:]) / 5
    assert last < 0.5 * first
    assert log["head_init"] == "random" and log["head_shift"] > 0 and log["probe"]["C"] in (0.01, 0.1, 1.0, 10.0, 100.0)
    # a pooled classifier: the encoder loads with AutoModel as it is, the head sits beside it
    header = json.loads((out / "mergelab_head.json").read_text())
    assert header["pooling"] == "mean" and header["label_names"] == ["class0", "class1", "class2"]
    AutoModel.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert label_names_of(out) == ["class0", "class1", "class2"]
    model = load_task_model(out, label_names=task.label_names)
    assert model.encoder.pooling == "mean" and isinstance(model.head, torch.nn.Linear)
    assert accuracy(model, task) > 0.8
    assert load_probe(out, 3) is not None
    # the expert's encoder is a fine-tune of the base: same keys, different values
    base_state = load_encoder(base).model.state_dict()
    expert_state = model.encoder.model.state_dict()
    assert base_state.keys() == expert_state.keys()
    assert not torch.equal(base_state["encoder.layer.0.attention.self.query.weight"],
                           expert_state["encoder.layer.0.attention.self.query.weight"])  # fmt: skip


def test_finetuning_is_seeded(tmp_path, base):
    task = make_task(per_class=4)
    settings = dict(FAST, epochs=1)
    a = finetune_expert(base, task, tmp_path / "a", progress=False, **settings)
    b = finetune_expert(base, task, tmp_path / "b", progress=False, **settings)
    c = finetune_expert(base, task, tmp_path / "c", progress=False, **dict(settings, seed=1))
    sa, sb, sc = (load_file(str(p / "mergelab_head.safetensors")) for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["weight"], sc["weight"])


def test_native_experts_are_the_familys_own_classifiers_started_from_the_probe(tmp_path, base):
    task = make_task(per_class=12)
    out = finetune_expert(base, task, tmp_path / "native", progress=False,
                          **dict(FAST, pooling="native", head_init="probe", epochs=3))  # fmt: skip
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.id2label == {0: "class0", 1: "class1", 2: "class2"}
    log = json.loads((out / "mergelab_training.json").read_text())
    assert log["head_init"] == "probe"
    model = load_task_model(out, label_names=task.label_names)
    assert model.encoder.pooling == "pooler" and accuracy(model, task) > 0.8


def test_every_task_starts_from_its_own_head_rows():
    cfg = FinetuneConfig(seed=0)
    assert cfg.task_seed("a") != cfg.task_seed("b") and cfg.task_seed("a") == FinetuneConfig(seed=0).task_seed("a")
    assert cfg.task_seed("a") != FinetuneConfig(seed=1).task_seed("a")
    two = random_linear_head(8, 2, derive_seed(cfg.task_seed("two"), "head")).weight
    twenty = random_linear_head(8, 20, derive_seed(cfg.task_seed("twenty"), "head")).weight
    assert not torch.allclose(two, twenty[:2])  # the old shared seed made these rows equal
    same_seed = random_linear_head(8, 20, derive_seed(cfg.task_seed("two"), "head")).weight
    assert torch.equal(two, same_seed[:2])  # ... which is what one seed for every task does


def test_probe_warm_start_begins_at_the_probe_and_fine_tuning_improves_on_it(tmp_path, base):
    task = make_task(per_class=12)
    out = finetune_expert(base, task, tmp_path / "lpft", progress=False,
                          **dict(FAST, head_init="probe", epochs=2, lr=1e-3))  # fmt: skip
    log = json.loads((out / "mergelab_training.json").read_text())
    assert log["head_init"] == "probe" and log["probe"]["examples"] == 36
    probe = load_probe(out, 3)
    base_features = load_encoder(base, pooling="mean").encode_texts(task.splits["train"].texts)
    with torch.no_grad():
        probe_train = (probe(base_features).argmax(1) == torch.tensor(task.splits["train"].labels)).double().mean()
    assert abs(float(probe_train) - log["probe"]["train_accuracy"]) < 1e-9
    assert log["first_loss"] < 1.0986  # started from the probe, not from chance (ln 3)


def test_train_size_takes_a_stratified_subset(tmp_path, base):
    out = finetune_expert(base, make_task(per_class=8), tmp_path / "e", progress=False,
                          **dict(FAST, epochs=1, train_size=6))  # fmt: skip
    log = json.loads((out / "mergelab_training.json").read_text())
    assert log["examples"] == 6 and log["steps"] == 1


def test_second_get_or_train_expert_trains_nothing(tmp_path, base, count_calls):
    task = make_task(per_class=4)
    calls = count_calls(experts, "finetune_expert")
    settings = dict(FAST, epochs=1)
    path = get_or_train_expert(tmp_path / "experts", base, task, progress=False, **settings)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again = get_or_train_expert(tmp_path / "experts", base, task, progress=False, **settings)
    assert again == path and len(calls) == 1
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # spelling out a default is the same expert; a different hyper-parameter is another one
    same = get_or_train_expert(tmp_path / "experts", base, task, progress=False, head_lr=2e-3, **settings)
    assert same == path and len(calls) == 1
    assert not [p for p in (tmp_path / "experts").iterdir() if p.name.startswith(".")]


def test_expert_cache_key_tracks_what_determines_the_expert(tmp_path, base):
    task = make_task(per_class=4)
    key = expert_cache_key(base, task, **FAST)
    assert key == expert_cache_key(base, make_task(per_class=4), **FAST)
    for changed in [dict(FAST, lr=1e-3), dict(FAST, seed=1), dict(FAST, max_length=8), dict(FAST, train_size=5),
                    dict(FAST, epochs=2), dict(FAST, batch_size=4), dict(FAST, warmup_ratio=0.1),
                    dict(FAST, pooling="native"), dict(FAST, head_init="probe"), dict(FAST, head_lr=1e-3)]:  # fmt: skip
        assert expert_cache_key(base, task, **changed) != key, changed
    assert expert_cache_key(base, make_task(per_class=4, seed=3), **FAST) != key  # other training data
    relabelled = Task(task.name, task.splits, ["x", "y", "z"])
    assert expert_cache_key(base, relabelled, **FAST) != key
    other_test = Task(task.name, {**task.splits, "test": Split(["alpha"], [0])}, task.label_names)
    assert expert_cache_key(base, other_test, **FAST) == key  # the expert never sees the test split
    assert expert_cache_key(tiny_base(tmp_path / "b2", seed=5), task, **FAST) != key  # other base weights
    with pytest.raises(ConfigError, match="unknown fine-tuning parameter"):
        expert_cache_key(base, task, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        expert_cache_key(base, task, warmup_ratio=1.5)


def test_one_recipe_for_the_api_and_the_bench_config():
    assert ExperimentConfig.model_fields["finetune"].annotation is FinetuneConfig  # used whole, not copied
    # the demo's recipe, as the expert cache key hashes it: a change here retrains every cached expert
    assert demo_config().finetune.model_dump() == {
        "epochs": 3.0, "lr": 1e-4, "max_length": 64, "batch_size": 32, "train_size": 1200, "seed": 0,
        "weight_decay": 0.01, "warmup_ratio": 0.1, "pooling": "mean", "head_init": "random", "head_lr": 2e-3,
    }  # fmt: skip
    assert FinetuneConfig.from_kwargs(epochs=2, lr="1e-3").model_dump() == dict(FinetuneConfig().model_dump(),
                                                                               epochs=2.0, lr=1e-3)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown fine-tuning parameter.*learning_rate"):
        FinetuneConfig.from_kwargs(learning_rate=1e-3)
    with pytest.raises(ConfigError, match="'pooling': Input should be 'mean' or 'native'"):
        FinetuneConfig.from_kwargs(pooling="cls")
    with pytest.raises(ConfigError, match="'head_lr': Input should be greater than 0"):
        FinetuneConfig.from_kwargs(head_lr=0)


def test_a_failed_save_leaves_nothing(tmp_path, base, monkeypatch):
    task = make_task(per_class=2)
    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    with pytest.raises(OutputError, match=r"disk full\); nothing was written"):
        finetune_expert(base, task, tmp_path / "out" / "expert", progress=False, **dict(FAST, epochs=1))
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_inputs_are_clear_errors(tmp_path, base):
    with pytest.raises(CheckpointError, match="no config.json"):
        finetune_expert(tmp_path, make_task(), tmp_path / "x", progress=False)
    one_class = Task("one", {"train": Split(["alpha"], [0]), "test": Split(["beta"], [0])}, ["only"])
    with pytest.raises(DataError, match="at least 2"):
        finetune_expert(base, one_class, tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="threads"):
        finetune_expert(base, make_task(), tmp_path / "x", progress=False, threads=0)


def test_multitask_baseline_trains_one_encoder_with_per_task_heads(tmp_path, base):
    tasks = [make_task("three", per_class=10, seed=0), make_task("two", num_classes=2, per_class=10, seed=1)]
    out = finetune_multitask(base, tasks, tmp_path / "mtl", progress=False, **dict(FAST, lr=3e-3, epochs=10))
    record = json.loads((out / "mergelab_multitask.json").read_text())
    assert record["steps"] == 10 * 4 + 10 * 3  # 30 and 20 examples in batches of 8, round-robin
    for name, losses in record["task_losses"].items():  # round-robin mixes the tasks: compare per task
        assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, name
    models = load_multitask(out, label_names={t.name: t.label_names for t in tasks})
    assert set(models) == {"three", "two"}
    assert models["three"].encoder is models["two"].encoder  # one shared encoder
    assert models["three"].num_classes == 3 and models["two"].num_classes == 2
    for task in tasks:
        assert accuracy(models[task.name], task) > 0.8
    # the saved encoder is in base layout: any encoder + heads evaluation reads it from the folder
    feats = FeatureCache(tmp_path / "cache", progress=False).features(load_encoder(out, pooling="mean"), "mtl", tasks[1],
                                                                      splits=("test",))  # fmt: skip
    torch.testing.assert_close(feats.split("test").features, models["two"].encoder.encode_texts(tasks[1].splits["test"].texts))
    with pytest.raises(DataError, match="differ"):
        load_multitask(out, label_names={"two": ["b", "a"]})
    with pytest.raises(DataError, match="distinct"):
        finetune_multitask(base, [tasks[0], tasks[0]], tmp_path / "dup", progress=False)


def test_second_get_or_train_multitask_trains_nothing_and_the_key_tracks_tasks(tmp_path, base, count_calls):
    tasks = [make_task("a", per_class=4, seed=0), make_task("b", num_classes=2, per_class=4, seed=1)]
    calls = count_calls(experts, "finetune_multitask")
    settings = dict(FAST, epochs=1)
    path = get_or_train_multitask(tmp_path / "cache", base, tasks, progress=False, **settings)
    again = get_or_train_multitask(tmp_path / "cache", base, tasks, progress=False, **settings)
    assert again == path and len(calls) == 1
    key = multitask_cache_key(base, tasks, **settings)
    assert key != multitask_cache_key(base, tasks[::-1], **settings)  # head order is part of the model
    assert key != multitask_cache_key(base, tasks, **dict(settings, lr=1e-3))
    assert key != multitask_cache_key(base, [tasks[0], make_task("b", num_classes=2, per_class=4, seed=2)], **settings)
