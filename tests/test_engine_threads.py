"""The engine's reader and writer threads: order, bounded read-ahead, errors propagate, nothing hangs or leaks."""

from __future__ import annotations

import threading

import pytest
import torch

from mergelab.core.errors import CheckpointError
from mergelab.io.formats import StateDictReader, prefetched
from mergelab.io.writer import BackgroundWriter, ShardedWriter, TensorSpec
from mergelab.merging.api import merge_streaming
from mergelab.merging.engine import plan_merge, stream_merge
from mergelab.merging.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams
from mergelab.merging.methods.ties import Ties, TiesParams
from mergelab.merging.selection import TensorSelection


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("mergelab-")}


def _states(n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{f"w{i}": torch.randn(64, 32, generator=gen) for i in range(n)} for _ in range(4)]


class _Failing(StateDictReader):
    def _tensor(self, name: str) -> torch.Tensor:  # under both get (a copy) and view (read-only, borrowing methods)
        if name == "w2":
            raise CheckpointError("disk gone")
        return super()._tensor(name)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_keeps_order(depth):
    groups = [[1, 2], [3], [4, 5, 6]]
    assert list(prefetched(groups, lambda x: x * 10, depth)) == [[10, 20], [30], [40, 50, 60]]
    assert not _threads()


def test_prefetched_raises_in_order_and_stops():
    def load(x):
        if x == 3:
            raise ValueError("bad")
        return x

    got = []
    with pytest.raises(ValueError, match="bad"):
        for group in prefetched([[1], [2], [3], [4]], load, 2):
            got.append(group)
    assert got == [[1], [2]]
    assert not _threads()


def test_prefetched_closed_early_stops_thread():
    stream = prefetched([[i] for i in range(100)], lambda x: torch.zeros(4), 2)
    next(stream)
    stream.close()
    assert not _threads()


def test_background_writer_error_propagates(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = BackgroundWriter(ShardedWriter(tmp_path, specs, 10**9))
    writer.write("b", torch.zeros(2))  # out of order: the thread fails
    with pytest.raises(CheckpointError, match="writer expected 'a'"):
        writer.write("a", torch.zeros(2))
        writer.close()
    writer.abort()
    assert not _threads()


class _HeldWriter(ShardedWriter):
    """Writes only once ``release`` is set (a slow disk)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.release = threading.Event()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.release.wait(timeout=10)
        super().write(name, tensor)


def test_background_writer_holds_at_most_its_byte_budget_queued(tmp_path):
    specs = [TensorSpec(f"t{i}", (16,), torch.float32) for i in range(3)]  # 64 bytes each
    held = _HeldWriter(tmp_path, specs, 10**9)
    writer = BackgroundWriter(held, budget=100)
    writer.write("t0", torch.zeros(16))  # queued alone: over no budget
    third = threading.Thread(target=lambda: [writer.write("t1", torch.ones(16)), writer.write("t2", torch.ones(16))])
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # 64 + 64 > 100 bytes: t1 waits for t0 to be written
    held.release.set()
    third.join(timeout=10)
    writer.close()
    assert not third.is_alive() and (tmp_path / "model.safetensors").exists()
    assert not _threads()


@pytest.mark.parametrize("make", [lambda: TaskArithmetic(TaskArithmeticParams(scale=0.3), 3),
                                  lambda: Ties(TiesParams(scope="global"), 3),
                                  lambda: Ties(TiesParams(scope="per_tensor"), 3)])  # fmt: skip
def test_prefetch_and_device_do_not_change_results(make):
    base, *models = [StateDictReader(s) for s in _states()]
    plan = plan_merge(base, models, TensorSelection((".*",), ()))
    inline = dict(stream_merge(make(), plan, prefetch=0))
    for kwargs in ({"prefetch": 2}, {"prefetch": 1, "device": torch.device("cpu")}):
        threaded = dict(stream_merge(make(), plan, **kwargs))
        assert all(torch.equal(inline[k].view(torch.int32), threaded[k].view(torch.int32)) for k in inline)


def test_failing_reader_stops_merge_and_cleans_up(tmp_path):
    base, *models = _states()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="disk gone"):
        merge_streaming(TaskArithmetic(TaskArithmeticParams(scale=0.3), 3), _Failing(base), models, out,
                        max_shard_size=1000)  # fmt: skip
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not _threads()


def test_merge_streaming_device_cpu_matches_default(tmp_path):
    base, *models = _states()
    method = TaskArithmetic(TaskArithmeticParams(scale=0.3), 3)
    default = merge_streaming(method, base, models)
    on_cpu = merge_streaming(method, base, models, device="cpu")
    assert all(torch.equal(default[k], on_cpu[k]) for k in default)
