"""The `mergelab` command. Thin: parse, call the library, print. Any MergelabError → one line, exit code 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mergelab.errors import MergelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge fine-tuned models and evaluate them honestly.")
F = TypeVar("F", bound=Callable[..., Any])


def _console() -> Console:
    return Console(stderr=False)


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


def _progress_bar(description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not sys.stderr.isatty(), console=Console(stderr=True), transient=False,
    )  # fmt: skip


@app.command("merge")
@friendly_errors
def merge_command(
    method: str = typer.Option(None, "--method", help="merging method (see `mergelab methods`)"),
    base: str = typer.Option(None, "--base", help="pretrained base checkpoint (HF folder or weights file)"),
    model: list[str] = typer.Option(None, "--model", help="a fine-tuned checkpoint; repeat for each model"),
    param: list[str] = typer.Option(None, "--param", help="method parameter key=value; repeatable"),
    out: str = typer.Option(None, "--out", help="output folder (written atomically)"),
    config: Path = typer.Option(None, "--config", help="YAML config with the same fields (see README)"),
    include: list[str] = typer.Option(None, "--include", help="regex of tensors to merge (default: all float)"),
    exclude: list[str] = typer.Option(None, "--exclude", help="regex of tensors not to merge (default: heads)"),
    dtype: str = typer.Option(None, "--dtype", help="output dtype: fp32, fp16, bf16 (default: keep source)"),
    max_shard_size: str = typer.Option(None, "--max-shard-size", help="e.g. 2GB, 500MB"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="merge even if inputs hold NaN/Inf"),
) -> None:
    """Merge fine-tuned checkpoints of one base model into one checkpoint."""
    from mergelab.config import MergeConfig, load_yaml_config, parse_param, validate_config
    from mergelab.merge.api import merge

    if config is not None:
        cfg = load_yaml_config(config, MergeConfig)
        overrides = {"force": force or cfg.force, "allow_nonfinite": allow_nonfinite or cfg.allow_nonfinite}
        cfg = cfg.model_copy(update=overrides)
    else:
        data: dict[str, Any] = {"method": method, "base": base, "models": model or [], "out": out,
                                "params": dict(parse_param(p) for p in (param or []))}  # fmt: skip
        for key, value in (("include", include), ("exclude", exclude), ("dtype", dtype),
                           ("max_shard_size", max_shard_size)):  # fmt: skip
            if value:
                data[key] = value
        data.update(force=force, allow_nonfinite=allow_nonfinite)
        cfg = validate_config(data, MergeConfig, "from the command line")
    with _progress_bar("merging") as bar:
        task = bar.add_task(f"{cfg.method}", total=None)

        def report(phase: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{cfg.method}: {phase}")

        result = merge(
            cfg.method, cfg.base, cfg.models, cfg.out, include=cfg.include, exclude=cfg.exclude, dtype=cfg.dtype,
            max_shard_size=cfg.max_shard_size, force=cfg.force, allow_nonfinite=cfg.allow_nonfinite,
            progress=report, **cfg.params,
        )  # fmt: skip
    typer.echo(f"merged {len(cfg.models)} model(s) with {cfg.method} -> {result}")


@app.command("methods")
@friendly_errors
def methods_command() -> None:
    """List every merging method with its parameters, defaults and docs."""
    from mergelab.merge.registry import list_methods

    console = _console()
    for info in list_methods():
        flags = [] if info["needs_base"] else ["no base needed"]
        if info["transductive"]:
            flags.append("transductive")
        console.print(f"[bold]{info['name']}[/bold] — {info['summary']}" + (f" ({', '.join(flags)})" if flags else ""))
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        for column in ("param", "type", "default", "range", "doc"):
            table.add_column(column)
        for row in info["params"]:
            table.add_row(row["name"], row["type"], row["default"], row["range"], row["doc"])
        console.print(table)
        console.print()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
