"""Feature extraction and its on-disk cache: hits run no forward pass, keys track content, corruption recovers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergelab.core.errors import ConfigError, DataError
from mergelab.evaluation.features import FeatureCache, cache_file, cache_key, extract_features
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.models.hf import load_task_model
from tests._hf_helpers import Split, Task, make_task, own_logits, tiny_classifier


class Counter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *args: object) -> None:
        self.calls += 1


@pytest.fixture
def expert(tmp_path):
    path = tiny_classifier("bert", tmp_path / "expert")
    return path, load_task_model(path)


def test_features_of_every_split_match_the_models_own_logits(tmp_path, expert):
    path, model = expert
    task = make_task()
    feats = FeatureCache(tmp_path / "cache", progress=False).features(model.encoder, "fp", task, batch_size=4)
    assert set(feats.splits) == {"train", "validation", "test"}
    for name, split in task.splits.items():
        got = feats.split(name)
        assert got.features.dtype == torch.float32 and got.features.shape == (len(split), 32)
        assert torch.equal(got.labels, torch.tensor(split.labels))
        with torch.no_grad():  # teacher logits are head(features): nothing else needs caching
            torch.testing.assert_close(model.head(got.features), own_logits(path, split.texts), atol=1e-5, rtol=1e-4)
    assert not got.features.requires_grad


def test_a_cache_hit_runs_no_forward_pass(tmp_path, expert):
    path, model = expert
    task = make_task()
    counter = Counter(model.encoder.model)
    fp = checkpoint_fingerprint(path)
    first_cache = FeatureCache(tmp_path / "cache", progress=False)
    first = first_cache.features(model.encoder, fp, task, splits=("train", "test"), batch_size=8)
    assert counter.calls == 5 and first_cache.computed == 2  # 24 train + 15 test items: 3 + 2 batches of 8
    counter.calls = 0
    cache = FeatureCache(tmp_path / "cache", progress=False)
    again = cache.features(model.encoder, fp, task, splits=("train", "test"), batch_size=8)
    assert counter.calls == 0 and cache.hits == 2 and cache.computed == 0
    assert torch.equal(first.split("test").features, again.split("test").features)
    built = []  # a lazily built (e.g. merged) encoder is not even built on a hit

    def build() -> torch.nn.Module:
        built.append(1)
        return model.encoder

    cache.features(build, fp, task, splits=("test",), batch_size=8, kind="pooler")
    assert built == [] and counter.calls == 0
    cache.features(build, fp, task, splits=("validation",), batch_size=8, kind="pooler")
    assert built == [1] and counter.calls == 1


def test_the_cache_key_tracks_weights_task_split_kind_and_max_length(tmp_path, expert):
    _, model = expert
    key = cache_key("fp", "task", "test", "pooler", 64)
    variants = [cache_key("fp2", "task", "test", "pooler", 64), cache_key("fp", "task2", "test", "pooler", 64),
                cache_key("fp", "task", "train", "pooler", 64), cache_key("fp", "task", "test", "cls", 64),
                cache_key("fp", "task", "test", "pooler", 32)]  # fmt: skip
    names = {cache_file(tmp_path, k).name for k in [key, *variants]}
    assert len(names) == 6
    task = make_task()
    counter = Counter(model.encoder.model)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    cache.features(model.encoder, "fp", task, splits=("test",))
    for fingerprint, changed_task, max_length in [("fp", task, 8), ("other-weights", task, 128),
                                                  ("fp", make_task(seed=1), 128)]:  # fmt: skip
        counter.calls = 0
        cache.features(model.encoder, fingerprint, changed_task, splits=("test",), max_length=max_length)
        assert counter.calls > 0, (fingerprint, max_length)
    assert cache.computed == 4 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    # max_length really truncates: features at 3 tokens ([CLS] word [SEP]) differ from the full ones
    short = cache.features(model.encoder, "fp", task, splits=("test",), max_length=3).split("test").features
    full = cache.features(model.encoder, "fp", task, splits=("test",)).split("test").features
    assert not torch.allclose(short, full)


def test_a_corrupt_or_foreign_cache_file_is_recomputed_and_overwritten(tmp_path, expert):
    _, model = expert
    task = make_task()
    cache = FeatureCache(tmp_path / "cache", progress=False)
    good = cache.features(model.encoder, "fp", task, splits=("test",)).split("test").features
    (file,) = (tmp_path / "cache").glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:60])
    again = FeatureCache(tmp_path / "cache", progress=False)
    with pytest.warns(UserWarning, match="unreadable"):
        recomputed = again.features(model.encoder, "fp", task, splits=("test",)).split("test").features
    assert again.computed == 1 and torch.equal(recomputed, good)
    assert torch.equal(load_file(str(file))["features"], good)  # the file was overwritten with valid data
    other = tmp_path / "cache2"  # a valid file under the wrong name (another entry's data) is not trusted
    FeatureCache(other, progress=False).features(model.encoder, "fp", task, splits=("train",))
    (train_file,) = other.glob("*.safetensors")
    train_file.rename(cache_file(other, cache_key("fp", task.content_hash(), "test", "pooler", 128)))
    third = FeatureCache(other, progress=False)
    assert torch.equal(third.features(model.encoder, "fp", task, splits=("test",)).split("test").features, good)
    assert third.computed == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp files left


def test_an_unwritable_cache_warns_and_still_returns_features(tmp_path, expert):
    _, model = expert
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot write"):
        feats = FeatureCache(blocker / "cache", progress=False).features(model.encoder, "fp", make_task(),
                                                                         splits=("test",))  # fmt: skip
    assert len(feats.split("test")) == 15


def test_bad_requests_are_clear_errors(tmp_path, expert):
    _, model = expert
    task = make_task()
    cache = FeatureCache(tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="no split"):
        cache.features(model.encoder, "fp", task, splits=("dev",))
    with pytest.raises(ConfigError, match="kind"):
        cache.features(lambda: model.encoder, "fp", task, splits=("test",))
    with pytest.raises(DataError, match="inputs"):
        cache.features(torch.nn.Linear(3, 2), "fp", task, splits=("test",))


def test_user_tensor_encoders_are_cached_too(tmp_path):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Dropout(0.5))  # eval mode: dropout off
    x = torch.randn(10, 5)
    task = Task("vec", {"train": Split([], list(range(2)) * 5, x), "test": Split([], [0, 1] * 5, x + 1)}, ["a", "b"])
    with torch.no_grad():
        expected = encoder.eval()(x + 1)
    encoder.train()
    counter = Counter(encoder)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    feats = cache.features(encoder, "user-fp", task, batch_size=3)
    torch.testing.assert_close(feats.split("test").features, expected)
    assert counter.calls == 8  # 4 batches per split
    FeatureCache(tmp_path / "cache", progress=False).features(encoder, "user-fp", task, batch_size=3)
    assert counter.calls == 8
    with pytest.raises(ConfigError, match=r"features \[B, d\]"):
        extract_features(torch.nn.Identity(), torch.randn(4, 2, 3))


def test_evaluating_twice_through_the_api_runs_no_encoder_forward(tmp_path, monkeypatch):
    """End to end: every protocol reads the cache, so a second evaluation does no encoder forward pass."""
    from transformers.models.bert import modeling_bert

    from mergelab.evaluation.api import evaluate

    tasks = {"a": make_task("a", seed=0), "b": make_task("b", num_classes=2, seed=1)}
    data, finetuned = {}, {}
    for name, task in tasks.items():
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for split, part in task.splits.items():
            rows = ["text,label"] + [f"{t},{task.label_names[y]}" for t, y in zip(part.texts, part.labels, strict=True)]
            (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
        data[name] = folder
        finetuned[name] = tiny_classifier("bert", tmp_path / f"ft-{name}", num_labels=task.num_classes,
                                          seed=len(name) + ord(name))  # fmt: skip
    calls = []
    forward = modeling_bert.BertModel.forward

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertModel, "forward", counting)
    kwargs = dict(protocols=("current", "knn"), num_seeds=1, cache_dir=tmp_path / "cache", progress=False)
    first = evaluate(finetuned["a"], finetuned, data, **kwargs)
    assert calls
    calls.clear()
    second = evaluate(finetuned["a"], finetuned, data, **kwargs)
    assert calls == []
    assert len(first) == 4 and first == second
