"""Checkpoint readers, key alignment and the atomic sharded writer."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from mergelab.core.errors import CheckpointError
from mergelab.io.alignment import KeyMapping, align, find_key_mapping
from mergelab.io.reader import open_checkpoint
from mergelab.io.writer import TensorSpec, atomic_folder, parse_size, plan_shards, save_state_dict


def test_reads_hf_folder_lazily(family):
    base, models = family
    reader = open_checkpoint(models[0])
    assert "bert.embeddings.word_embeddings.weight" in reader.keys()
    assert reader.shape("bert.embeddings.word_embeddings.weight") == (64, 32)
    assert reader.dtype("classifier.weight") == torch.float32
    expected = load_file(str(models[0] / "model.safetensors"))
    for name in reader.keys():
        assert torch.equal(reader.get(name), expected[name])


def test_sharded_round_trip_loads_with_automodel(family, tmp_path):
    base, _ = family
    state = load_file(str(base / "model.safetensors"))
    out = save_state_dict(state, tmp_path / "sharded", max_shard_bytes=20_000, config_source=base)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reader = open_checkpoint(out)
    assert sorted(reader.keys()) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(reader.get(name), tensor)
    model = AutoModel.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name])


def test_bf16_round_trip(tmp_path):
    state = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(4)}
    out = save_state_dict(state, tmp_path / "bf16")
    reader = open_checkpoint(out / "model.safetensors")
    assert reader.dtype("a") == torch.bfloat16
    assert torch.equal(reader.get("a"), state["a"]) and torch.equal(reader.get("b"), state["b"])


def test_plan_shards_respects_limit():
    specs = [TensorSpec(f"t{i}", (10,), torch.float32) for i in range(10)]  # 40 bytes each
    shards = plan_shards(specs, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(5) == 5
    with pytest.raises(CheckpointError, match="shard size"):
        parse_size("lots")


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.randn(100, 100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        open_checkpoint(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        open_checkpoint(tmp_path / "tiny.safetensors")


class _NotWeights:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    with open(path, "wb") as handle:
        pickle.dump({"w": _NotWeights()}, handle)
    with pytest.raises(CheckpointError, match="not a weights-only"):
        open_checkpoint(path)


def test_weights_only_torch_file_reads(tmp_path):
    state = {"w": torch.randn(2, 3), "b": torch.zeros(3)}
    torch.save(state, tmp_path / "model.pt")
    reader = open_checkpoint(tmp_path / "model.pt")
    assert torch.equal(reader.get("w"), state["w"])
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    assert sorted(open_checkpoint(folder).keys()) == ["b", "w"]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")


def test_shard_index_with_missing_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing shard"):
        open_checkpoint(folder)


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_folder(target):
            pass


def test_atomic_folder_force_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_folder(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["new"]


def test_key_mapping_strips_and_adds_prefixes():
    base = ["embeddings.w", "encoder.layer.0.w", "pooler.dense.weight"]
    finetuned = ["bert.embeddings.w", "bert.encoder.layer.0.w", "bert.pooler.dense.weight", "classifier.weight"]
    assert find_key_mapping(base, finetuned) == KeyMapping(strip="bert")
    assert find_key_mapping(finetuned, base) == KeyMapping(add="bert")
    assert find_key_mapping(base, base) == KeyMapping()


def test_aligned_reader_bare_base_vs_prefixed_model(family):
    base, models = family
    aligned = align(open_checkpoint(base), open_checkpoint(models[0]))
    assert "embeddings.word_embeddings.weight" in aligned
    assert aligned.source_name("embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"
    assert set(aligned.unmapped_keys()) == {"classifier.weight", "classifier.bias"}


def test_views_map_the_stored_bytes_and_never_write_the_file(tmp_path):
    state = {"a": torch.randn(3, 5), "h": torch.arange(7, dtype=torch.bfloat16), "b": torch.randn(11), "e": torch.zeros(0)}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    before = path.read_bytes()
    reader = open_checkpoint(path)
    for name, tensor in state.items():
        view = reader.view(name)
        assert view.dtype == tensor.dtype and torch.equal(view, tensor) and torch.equal(view, reader.get(name))
    view = reader.view("a")
    view.mul_(0)  # copy-on-write: a stray write stays in this process
    assert path.read_bytes() == before and torch.equal(reader.view("a"), state["a"])


def test_a_view_of_a_range_not_aligned_to_its_dtype_is_read_instead(tmp_path, monkeypatch):
    import mergelab.io.formats as formats

    path = tmp_path / "raw.bin"
    values = torch.arange(6, dtype=torch.float32)
    path.write_bytes(b"\x00" + values.numpy().tobytes())
    mapped = formats._map_range(path, 1, 25, (6,), torch.float32)  # starts at byte 1: not a float32 boundary
    assert torch.equal(mapped, values)
    assert torch.equal(formats._map_range(path, 1, 1, (0,), torch.float32), torch.zeros(0))


def test_state_dict_view_is_the_callers_tensor_and_borrowing_merges_leave_it_unchanged():
    import mergelab
    from mergelab.io.formats import StateDictReader

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=generator)}
    models = [{"w": base["w"] + torch.randn(40, 30, generator=generator)} for _ in range(3)]
    assert StateDictReader(base).view("w") is base["w"]
    copies = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    for method, params in [("task_arithmetic", {}), ("ties", {"scope": "global"}), ("ties", {"scope": "per_tensor"})]:
        mergelab.merge(method, base, models, **params)
        assert all(torch.equal(m["w"], c["w"]) for m, c in zip([base, *models], copies, strict=True))
