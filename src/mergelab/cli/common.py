"""Shared pieces of the `mergelab` command: the Typer app, one-line errors, consoles, TASK=PATH pairs."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergelab import __version__
from mergelab.core.errors import ConfigError, MergelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Merge fine-tuned models and evaluate them honestly.")
F = TypeVar("F", bound=Callable[..., Any])


def console() -> Console:
    console = Console(stderr=False)
    if not console.is_terminal:  # piped (make demo | tee): wide enough for the tables
        console = Console(stderr=False, width=160)
    return console


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _quiet_libraries(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="print the version and exit"),  # fmt: skip
) -> None:
    """Keep the terminal for mergelab's own progress: silence transformers' load reports and the hub's bars, through
    the environment they read when first imported (importing transformers here to set them cost every command,
    `mergelab merge` included, ≈ 1 s); a user's own settings of these variables win."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (an embedding program, the tests): too late for the variables
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def friendly_errors(func: F) -> F:
    """Turn library errors into a one-line message and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MergelabError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written to the output", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def progress_bar(description: str):
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not sys.stderr.isatty(), console=Console(stderr=True), transient=False,
    )  # fmt: skip


def pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for value in values or []:
        if "=" not in value:
            raise ConfigError(f"{flag} expects TASK=PATH, got '{value}'")
        task, path = value.split("=", 1)
        out[task.strip()] = path.strip()
    return out



def pair_models_with_data(models: list[str], data: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--model`` / ``--data`` values → ({task: checkpoint}, {task: data path}).

    Either every value is ``TASK=PATH`` (paired by task name, in any order) or none is (paired by position, tasks
    named ``task0``, ``task1``, ...).
    """
    named = [("=" in v) for v in [*models, *data]]
    if not models:
        raise ConfigError("give the fine-tuned models: --model TASK=PATH, once per task")
    if any(named) and not all(named):
        raise ConfigError("either name every --model and --data as TASK=PATH or none of them (then pair by order)")
    if not all(named):
        if len(data) != len(models):
            raise ConfigError(
                f"data-dependent merging needs one --data PATH per --model ({len(models)} models, {len(data)} data); "
                "or name them: --model TASK=PATH --data TASK=PATH"
            )
        names = [f"task{i}" for i in range(len(models))]
        return dict(zip(names, models, strict=True)), dict(zip(names, data, strict=True))
    finetuned, folders = pairs(models, "--model"), pairs(data, "--data")
    if len(finetuned) != len(models) or len(folders) != len(data):
        raise ConfigError("a task is named twice in --model or --data; name each task once")
    if set(finetuned) != set(folders):
        raise ConfigError(
            f"--model and --data must name the same tasks; without data: {sorted(set(finetuned) - set(folders))}, "
            f"without a model: {sorted(set(folders) - set(finetuned))}"
        )
    return finetuned, folders
