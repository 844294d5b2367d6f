"""The `mergelab` command. Thin: parse, call the library, print. Any MergelabError → one line, exit code 1.

Each command module registers its commands on the one Typer ``app`` when imported here.
"""

from __future__ import annotations

from mergelab.cli import bench, evaluate, merge  # noqa: F401 - registers the commands on ``app``
from mergelab.cli.common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry
    app()
