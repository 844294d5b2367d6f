"""A `mergelab bench` driver run as a subprocess and killed with SIGKILL once it has committed some rows (the resume
tests of the local and the Ray executors)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_command(config: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    """The `mergelab bench` command line (this Python, this checkout's sources)."""
    return [sys.executable, "-c", "from mergelab.cli import main; main()", "bench", str(config), "--out", str(run),
            "--cache-dir", str(cache), *extra]  # fmt: skip


def bench_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def count_result_rows(db: Path) -> int:
    """Rows committed to a run's results.sqlite so far (0 while it does not exist or is locked)."""
    try:
        with sqlite3.connect(db, timeout=0.1) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_after_first_commit(cmd: list[str], run: Path, timeout: float = 120.0) -> int:
    """Start ``cmd``, SIGKILL it once ``run``'s store holds a row, and return how many rows it had committed."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=bench_env())
    deadline = time.time() + timeout
    while time.time() < deadline and count_result_rows(run / "results.sqlite") == 0 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return count_result_rows(run / "results.sqlite")
