"""A rich progress bar with an examples/s column, shown only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable


class progress_bar:  # noqa: N801 - used like a function in `with`
    """``with progress_bar(enabled, description, total) as advance:`` — ``advance(n)`` or None when hidden."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total, self.bar = enabled, description, total, None

    def __enter__(self) -> Callable[[int], None] | None:
        if not (self.enabled and sys.stderr.isatty()):
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} ex/s"), TimeElapsedColumn(),
                            console=Console(stderr=True))  # fmt: skip
        self.bar.start()
        task_id = self.bar.add_task(self.description, total=self.total, rate="–")

        def advance(n: int) -> None:
            self.bar.advance(task_id, n)
            speed = self.bar.tasks[0].speed
            self.bar.update(task_id, rate=f"{speed:.0f}" if speed else "–")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
