"""The results store: one SQLite file in the run folder.

SQLite is in the standard library, commits atomically, and survives kill -9 (its rollback journal undoes a
half-written transaction on the next open), so a run can be interrupted at any point and resumed: every cell is
keyed by what determines it, and a cell already stored is never computed again.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergelab.evaluation.results import ResultRow
from mergelab.io.writer import atomic_write_text

COLUMNS = (
    "key", "model", "method", "params", "protocol", "task", "seed", "shots", "accuracy", "normalized_accuracy",
    "transductive", "split", "extras",
)  # fmt: skip
CSV_COLUMNS = COLUMNS[1:]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL, params TEXT NOT NULL, protocol TEXT NOT NULL,
    task TEXT NOT NULL, seed INTEGER NOT NULL, shots INTEGER NOT NULL, accuracy REAL NOT NULL,
    normalized_accuracy REAL, transductive INTEGER NOT NULL, split TEXT NOT NULL, extras TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_INSERT = f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def cell_key(**parts: Any) -> str:
    """A stable key for a cell from everything that determines it."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


def _values(key: str, row: ResultRow) -> list[Any]:
    """The column values of one row, in ``COLUMNS`` order (the flag as 0/1, extras as JSON text)."""
    values = {column: getattr(row, column) for column in CSV_COLUMNS}
    values.update(key=key, transductive=int(bool(row.transductive)), extras=json.dumps(row.extras or {}, default=float))
    return [values[column] for column in COLUMNS]


class ResultStore:
    """Result rows (``ResultRow``) by cell key, plus a small key/value table for run metadata."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=DELETE")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def has(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None

    def has_all(self, keys: Iterable[str]) -> bool:
        return all(self.has(k) for k in keys)

    def add(self, rows: Mapping[str, ResultRow]) -> None:
        """Store ``{cell key: row}`` in one transaction (all or nothing); a key already stored is replaced."""
        with self.transaction():
            for key, row in rows.items():
                self._conn.execute(_INSERT, _values(key, row))

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Store rows given as dicts with their ``key`` (as :meth:`rows` returns them), in one transaction."""
        self.add({row["key"]: ResultRow.from_dict(row) for row in rows})

    def rows(self, split: str | None = "test") -> list[dict[str, Any]]:
        query = f"SELECT {', '.join(COLUMNS)} FROM results"
        args: tuple = ()
        if split is not None:
            query += " WHERE split = ?"
            args = (split,)
        out = []
        for values in self._conn.execute(query + " ORDER BY model, method, protocol, task, shots, seed", args):
            row = dict(zip(COLUMNS, values, strict=True))
            row["transductive"] = bool(row["transductive"])
            row["extras"] = json.loads(row["extras"])
            out.append(row)
        return out

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction():
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def export_csv(self, path: str | Path, split: str = "test") -> Path:
        """Write the rows of ``split`` as CSV (atomically)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in self.rows(split):
            row = dict(row)
            row["extras"] = json.dumps(row["extras"], sort_keys=True)
            writer.writerow(row)
        atomic_write_text(Path(path), buffer.getvalue())
        return Path(path)
