"""Writing outputs: a full disk or an unwritable folder is a one-line error, and nothing is left behind."""

from __future__ import annotations

import errno
import os

import pytest
from typer.testing import CliRunner

import mergelab.io.writer as writer_module
from mergelab.cli import app
from mergelab.core.errors import OutputError
from mergelab.io.writer import atomic_write_text, save_state_dict

runner = CliRunner()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_full_disk_during_cli_merge_is_one_line_and_leaves_nothing(family, tmp_path, monkeypatch):
    base, models = family
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    monkeypatch.setattr(writer_module.ShardedWriter, "write", _disk_full)
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--out", str(out_root / "merged")]
    for model in models:
        args += ["--model", str(model)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: no space left on the disk of") and "nothing was written" in lines[0]
    assert "Traceback" not in result.output
    assert _leftovers(out_root) == []


def test_full_disk_at_a_shards_fsync_is_one_line_and_leaves_nothing(family, tmp_path, monkeypatch):
    """The fsync of a finished shard runs on a helper thread; its failure still fails the merge cleanly."""
    base, models = family
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    monkeypatch.setattr(writer_module.os, "fsync", _disk_full)
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--out", str(out_root / "merged"),
            "--max-shard-size", "30KB"]  # fmt: skip
    for model in models:
        args += ["--model", str(model)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the disk of"), result.output
    assert _leftovers(out_root) == []


def test_full_disk_in_atomic_text_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    original = type(target).write_bytes

    def failing(self, *args, **kwargs):
        if self.name.startswith(".results.json.tmp-"):
            original(self, b"half")
            _disk_full()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "write_bytes", failing)
    with pytest.raises(OutputError, match=r"no space left on the disk of .* while writing .*results\.json"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == ["results.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_names_the_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match=r"cannot write .*locked/state"):
        save_state_dict({}, locked / "state")


def test_unwritable_folder_is_one_error_even_for_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot write .*file/state .*choose another output"):
        save_state_dict({}, blocker / "state")
