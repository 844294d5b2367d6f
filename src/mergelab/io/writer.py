"""Atomic, streaming, sharded safetensors writer.

The shard layout and headers are fixed up front from the names, shapes and dtypes of the output, so each tensor is
written to disk as soon as it is produced: memory stays bounded by the tensors queued for the writer thread. All
files go into a temporary folder next to the target, which is renamed onto the target only when everything has
been written; on any error or interrupt the temporary folder is removed and the target is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.core.errors import CheckpointError, OutputError
from mergelab.io.formats import POLL_S

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip

QUEUE_BYTES = 1 << 29  # output bytes the background writer may hold queued (or one tensor of any size)

# Files copied from the base folder so the output loads with transformers' Auto classes.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "added_tokens.json",
)  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of an output tensor, known before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '10KB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    cleaned = text.strip().upper()
    for unit, factor in units.items():
        if cleaned.endswith(unit) and cleaned[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(cleaned[: -len(unit)]) * factor)
    if cleaned.isdigit():
        return int(cleaned)
    raise CheckpointError(f"cannot parse shard size '{text}'; use e.g. 2GB, 500MB or a byte count")


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return [s for s in shards if s] or [[]]


def _header_bytes(shard: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": _DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
    return len(raw).to_bytes(8, "little") + raw


def _tensor_buffer(tensor: torch.Tensor):
    """A zero-copy byte view of the tensor's data (little-endian, row-major) for ``file.write``."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy()


class ShardedWriter:
    """Write tensors in a fixed order into sharded safetensors inside a temporary folder; see module doc."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        unsupported = [s.name for s in specs if s.dtype not in _DTYPE_CODES]
        if unsupported:
            raise CheckpointError(f"cannot write dtype of tensor(s) {unsupported[:3]} to safetensors")
        self.folder = folder
        self.shards = plan_shards(specs, max_shard_bytes)
        count = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._handle = None
        self._current_shard = -1
        self._syncs: list[Future] = []  # finished shards being flushed to disk (fsync) on a helper thread
        self._syncer: ThreadPoolExecutor | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the one the plan expects next, with its shape and dtype."""
        if self._position >= len(self._order):
            raise CheckpointError(f"unexpected extra tensor '{name}' written past the end of the plan")
        shard_index, spec = self._order[self._position]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(
                f"writer expected '{spec.name}' {spec.shape} {spec.dtype}, got '{name}' "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard_index != self._current_shard:
            self._open_shard(shard_index)
        assert self._handle is not None
        self._handle.write(_tensor_buffer(tensor))
        self._position += 1

    def _open_shard(self, index: int) -> None:
        self._close_handle()
        self._current_shard = index
        self._handle = open(self.folder / self.file_names[index], "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(_header_bytes(self.shards[index], {"format": "pt"}))

    def _close_handle(self) -> None:
        """Finish the open shard: it is flushed to disk (fsync) and closed on the helper thread while the next one is
        written (an inline fsync stalled the writer ≈ 0.3 s per 500 MB shard here); ``close`` waits for them all."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.flush()
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-fsync")
            self._syncs.append(self._syncer.submit(_sync_and_close, handle))

    def _finish_syncs(self) -> None:
        """Wait for every shard's fsync; the first error (a full disk, an I/O error) is raised once all have ended."""
        syncs, self._syncs = self._syncs, []
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        for sync in syncs:
            sync.result()

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded). Every planned tensor must be written."""
        if self._position != len(self._order):
            missing = self._order[self._position][1].name
            raise CheckpointError(f"writer closed before tensor '{missing}' was written")
        if not self._order:  # an empty checkpoint still gets a valid (empty) file
            self._open_shard(0)
        self._close_handle()
        self._finish_syncs()
        if len(self.shards) > 1:
            weight_map = {spec.name: self.file_names[i] for i, shard in enumerate(self.shards) for spec in shard}
            total = sum(spec.nbytes for shard in self.shards for spec in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        try:
            self._finish_syncs()
        except OSError:  # the caller is already failing and removes the folder
            pass


def _sync_and_close(handle) -> None:
    try:
        os.fsync(handle.fileno())
    finally:
        handle.close()


class BackgroundWriter:
    """A :class:`ShardedWriter` driven by one background thread, so writing overlaps the producer's work.

    ``write`` queues the tensor and returns; tensors queued (not yet being written) hold at most ``budget`` bytes,
    or one tensor of any size, so memory stays bounded while the producer runs ahead of a slow disk (a queue of one
    tensor kept the merge waiting ≈ 1 s of a 3.2 GB merge here). An error of the writer thread is raised by the
    next ``write`` or by ``close``. ``close`` waits for every queued tensor and finishes the files; ``abort`` stops
    the thread and closes the open file. Use it like the plain writer: ``close()`` on success, ``abort()`` on any
    error.
    """

    def __init__(self, writer: ShardedWriter, budget: int = QUEUE_BYTES) -> None:
        self.writer = writer
        self.budget = budget
        self._channel: queue.Queue = queue.Queue()  # bounded by the byte budget, not by a count
        self._room = threading.Condition()
        self._queued = 0  # bytes queued and not yet written
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergelab-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue the next tensor for writing, once the queue has room for it (raises the writer thread's error,
        if it has failed)."""
        self._raise_error()
        size = tensor.numel() * tensor.element_size()
        with self._room:
            while self._queued and self._queued + size > self.budget and not self._stop.is_set():
                self._room.wait(timeout=POLL_S)
            self._raise_error()
            self._queued += size
        self._channel.put((name, tensor, size))

    def close(self) -> None:
        """Write everything queued, then finish the last shard and the index."""
        self._channel.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.writer.close()

    def abort(self) -> None:
        """Stop the thread (dropping what is queued) and close the open file; the caller removes the folder."""
        self._stop.set()
        self._thread.join()
        self.writer.abort()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    entry = self._channel.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if entry is None:
                    return
                name, tensor, size = entry
                del entry
                self.writer.write(name, tensor)
                del tensor
                with self._room:
                    self._queued -= size
                    self._room.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in the producer's thread by write/close
            self._error = exc
            self._stop.set()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stop.is_set() or not self._thread.is_alive():
            raise CheckpointError("the writer thread has stopped")


def copy_side_files(source: Path | None, target: Path) -> list[str]:
    """Copy config and tokenizer files from ``source`` so the output loads with ``from_pretrained``."""
    copied = []
    if source is None:
        return copied
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def check_target(out: Path, force: bool) -> None:
    """An existing output is an error unless ``force``."""
    if out.exists() and not force:
        raise CheckpointError(f"output {out} already exists; choose another path or pass --force to replace it")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def output_error(exc: OSError, target: Path) -> OutputError:
    """A one-line error for an OSError raised while writing ``target`` (its temporary files already removed)."""
    if exc.errno in _NO_SPACE:
        return OutputError(f"no space left on the disk of {target.parent} while writing {target}; nothing was "
                           "written: free some space or choose an output on a disk with room")  # fmt: skip
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {target} ({reason}); nothing was written: check the folder's permissions "
                       "and free space, or choose another output")  # fmt: skip


@contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; rename it onto ``out`` only if the block completes."""
    out = Path(out)
    check_target(out, force)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(exc, out) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file and rename, so a reader never sees half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary file and rename: the old file (if any) stays whole until the new one is."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_state_dict(state_dict: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = 2 * 10**9,
                    config_source: Path | None = None, force: bool = False) -> Path:  # fmt: skip
    """Write an in-memory state dict as (sharded) safetensors + side files, atomically."""
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state_dict.items()]
    with atomic_folder(Path(out), force) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        try:
            for name, tensor in state_dict.items():
                writer.write(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_side_files(config_source, tmp)
    return Path(out)
