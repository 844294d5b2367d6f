"""`mergelab bench`, `report`, `demo`: benchmarks (`bench demo|full|vision|pleas|FILE.yaml`) and their reports.

The bench modules pull torch and transformers (~2 s to import), so they are imported inside the commands that run
them: `mergelab --help` and the other commands stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mergelab.cli.common import app, console, friendly_errors
from mergelab.core.errors import ConfigError

if TYPE_CHECKING:
    from mergelab.bench.config import ExperimentConfig
    from mergelab.bench.executor import ExecutorConfig

PLEAS = "pleas"  # `mergelab bench pleas`: the PLeaS vision benchmark (its own runner, no YAML)
DEFAULT_BUDGETS = "1.0,1.2,1.5,2.0"


@app.command("bench")
@friendly_errors
def bench_command(
    config: str = typer.Argument(..., help="experiment YAML, or a built-in one: 'demo', 'full', 'vision' or 'pleas'"),
    out: Path = typer.Option(..., "--out", help="run folder: results store, results.csv, report"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="experts and features cache (default: XDG cache)"),
    budgets: str = typer.Option(DEFAULT_BUDGETS, "--budgets", help="pleas only: width budgets between 1.0 and 2.0"),
    device: str = typer.Option(None, "--device", help="where models and protocols run: auto (CUDA, else MPS, else "
                               "CPU), cpu, cuda, cuda:N, mps (default: the config's device:, else auto)"),  # fmt: skip
    executor: str = typer.Option(None, "--executor", help="where the units of work run: local (this process) or ray "
                                 "(a Ray cluster; pip install 'mergelab[ray]') (default: the config's executor:, else local)"),
    ray_address: str = typer.Option(None, "--ray-address", help="ray: the cluster to join, 'auto' (the one `ray start "
                                    "--head` started here) or ray://host:port (default: a new local Ray); --cache-dir "
                                    "must then be a filesystem every node sees"),  # fmt: skip
) -> None:
    """Run (or resume) an experiment: experts, merges with validation-chosen grids, protocols, report."""
    if config == PLEAS and not Path(config).is_file():
        if device not in (None, "auto", "cpu"):
            raise ConfigError(f"--device {device}: the PLeaS benchmark runs on the CPU; drop --device")
        typer.echo(f"report: {run_pleas_benchmark(out, cache_dir, parse_budgets(budgets))}")
        return
    cfg = experiment_config(config)
    update = {"device": device} if device is not None else {}
    if executor is not None or ray_address is not None:
        update["executor"] = executor_config(cfg, executor, ray_address)
    run_experiment(cfg.model_copy(update=update), out, cache_dir)


def executor_config(cfg: ExperimentConfig, kind: str | None, address: str | None) -> ExecutorConfig:
    """The config's ``executor:`` with ``--executor`` / ``--ray-address`` applied (an address implies ray)."""
    from mergelab.bench.executor import ExecutorConfig  # lazy: see the module's docstring

    if kind not in (None, "local", "ray"):
        raise ConfigError(f"--executor must be 'local' or 'ray', got '{kind}'")
    if kind == "local" and address is not None:
        raise ConfigError("--ray-address needs --executor ray; drop one of them")
    base = cfg.executor or ExecutorConfig()
    return base.model_copy(update={"kind": kind or ("ray" if address else base.kind),
                                   "address": address if address is not None else base.address})  # fmt: skip


@app.command("report")
@friendly_errors
def report_command(run_dir: Path = typer.Argument(..., help="a run folder written by `mergelab bench`")) -> None:
    """(Re)build the Markdown + HTML report of a run from its results store."""
    from mergelab.bench.report import build_report  # lazy: see the module's docstring

    paths = build_report(run_dir)
    print_main_table(run_dir)
    typer.echo(f"report: {paths['markdown']} (and {paths['html']})")


@app.command("demo")
@friendly_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run folder"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="experts and features cache (default: XDG cache)"),
) -> None:
    """The embedded default: the offline MiniLM benchmark on four real text tasks (configs/demo.yaml)."""
    from mergelab.bench.config import demo_config  # lazy: see the module's docstring

    run_experiment(demo_config(), out, cache_dir)


def experiment_config(name: str) -> ExperimentConfig:
    """The experiment of ``name``: a YAML file, or a built-in one (``demo``, ``full``)."""
    from mergelab.bench.config import BUILTIN_CONFIGS, builtin_config, load_experiment_config  # lazy: see above

    if Path(name).is_file():
        return load_experiment_config(name)
    if name in BUILTIN_CONFIGS:
        return builtin_config(name)
    known = ", ".join((*BUILTIN_CONFIGS, PLEAS))
    raise ConfigError(f"no experiment '{name}': no such YAML file, and no built-in one of that name ({known})")


def run_experiment(cfg: ExperimentConfig, out: Path, cache_dir: Path | None) -> None:
    """Run (or resume) ``cfg`` into ``out``, then print its main table and where the report is."""
    from mergelab.bench.runner import run_benchmark  # lazy: see the module's docstring

    report = run_benchmark(cfg, out, cache_dir, log=log_to_stderr)
    print_main_table(out)
    typer.echo(f"report: {report} (and {report.with_suffix('.html')})")


def run_pleas_benchmark(out: Path, cache_dir: Path | None, budgets: list[float]) -> Path:
    """Run the PLeaS vision benchmark (``mergelab.bench.pleas_runner``) into ``out``; returns its report."""
    from mergelab.bench.pleas_runner import run_pleas  # lazy: see the module's docstring

    return run_pleas(out, cache_dir, log=log_to_stderr, budgets=tuple(budgets))


def parse_budgets(text: str) -> list[float]:
    """'1.0,1.5' → [1.0, 1.5]; anything else is a ConfigError."""
    try:
        return [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets must be comma-separated numbers, got '{text}'") from None


def log_to_stderr(message: str) -> None:
    typer.echo(message, err=True)


def print_main_table(run_dir: Path) -> None:
    """The run's main table (every model's task accuracies and average) on the terminal."""
    from mergelab.bench.report import config_methods, main_table, table_shots, task_order  # lazy: see above
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
