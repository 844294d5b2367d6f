"""`mergelab bench`, `report`, `demo`, `vision-bench`: benchmarks and their reports."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mergelab.cli.common import app, console, friendly_errors


@app.command("bench")
@friendly_errors
def bench_command(
    config: str = typer.Argument(..., help="experiment YAML, or a built-in one: 'demo' or 'full'"),
    out: Path = typer.Option(..., "--out", help="run folder: results store, results.csv, report"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="experts and features cache (default: XDG cache)"),
) -> None:
    """Run (or resume) an experiment: experts, merges with validation-chosen grids, protocols, report."""
    from mergelab.bench.config import BUILTIN_CONFIGS, builtin_config, load_experiment_config
    from mergelab.bench.runner import run_benchmark

    is_builtin = config in BUILTIN_CONFIGS and not Path(config).exists()
    cfg = builtin_config(config) if is_builtin else load_experiment_config(config)
    report = run_benchmark(cfg, out, cache_dir, log=lambda msg: typer.echo(msg, err=True))
    _print_main_table(out)
    typer.echo(f"report: {report} (and {report.with_suffix('.html')})")


@app.command("report")
@friendly_errors
def report_command(run_dir: Path = typer.Argument(..., help="a run folder written by `mergelab bench`")) -> None:
    """(Re)build the Markdown + HTML report of a run from its results store."""
    from mergelab.bench.report import build_report

    paths = build_report(run_dir)
    _print_main_table(run_dir)
    typer.echo(f"report: {paths['markdown']} (and {paths['html']})")


@app.command("demo")
@friendly_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run folder"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="experts and features cache (default: XDG cache)"),
) -> None:
    """The embedded default: the offline MiniLM benchmark on four real text tasks (configs/demo.yaml)."""
    from mergelab.bench.config import demo_config
    from mergelab.bench.runner import run_benchmark

    report = run_benchmark(demo_config(), out, cache_dir, log=lambda msg: typer.echo(msg, err=True))
    _print_main_table(out)
    typer.echo(f"report: {report} (and {report.with_suffix('.html')})")


@app.command("vision-bench")
@friendly_errors
def vision_bench_command(
    out: Path = typer.Option(Path("runs/vision"), "--out", help="output folder"),
    budgets: str = typer.Option("1.0,1.2,1.5,2.0", "--budgets", help="PLeaS width budgets between 1.0 and 2.0"),
) -> None:
    """PLeaS on two small CNNs trained from different inits (MNIST vs Fashion-MNIST); accuracy-vs-budget plot."""
    from mergelab.core.errors import ConfigError
    from mergelab.pleas.benchmark import run_vision_benchmark

    try:
        budget_list = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets must be comma-separated numbers, got '{budgets}'") from None
    results = run_vision_benchmark(out, budgets=budget_list, log=lambda msg: typer.echo(msg, err=True))
    table = Table(title="PLeaS vision benchmark: test accuracy (%)")
    rows = results.get("rows", [])
    columns = [k for k in (rows[0] if rows else {}) if k not in ("extras",)]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{100 * row[c]:.1f}" if c.endswith("_acc") else str(row[c]) for c in columns])
    console().print(table)
    typer.echo(f"wall time {results.get('wall_time_s', 0):.0f} s; results.json, results.csv and accuracy_vs_budget.png in {out}")


def _print_main_table(run_dir: Path) -> None:
    from mergelab.bench.report import config_methods, main_table, table_shots, task_order
    from mergelab.bench.store import ResultStore

    with ResultStore(Path(run_dir) / "results.sqlite") as store:
        rows = store.rows("test")
        methods = config_methods(store.get_meta("config"))
    if not rows:
        return
    tasks = task_order(rows)
    shots = table_shots(rows)
    table = Table(title=f"accuracy (%) on test, mean ± std over seeds ({shots}-shot rows); † transductive")
    for column in ("", *tasks, "Avg"):
        table.add_column(column, justify="right" if column else "left")
    for label, cells, transductive in main_table(rows, tasks, shots, methods):
        table.add_row(label + (" †" if transductive else ""), *cells)
    console().print(table)
