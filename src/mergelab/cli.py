"""The `mergelab` command. Thin: parse, call the library, print. Any MergelabError → one line, exit code 1."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mergelab.core.errors import MergelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Merge fine-tuned models and evaluate them honestly.")
F = TypeVar("F", bound=Callable[..., Any])


def _console() -> Console:
    console = Console(stderr=False)
    if not console.is_terminal:  # piped (make demo | tee): wide enough for the tables
        console = Console(stderr=False, width=160)
    return console


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for mergelab's own progress: silence transformers' load reports and bars."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
    model: list[str] = typer.Option(None, "--model", help="a fine-tuned checkpoint or LoRA adapter folder; repeatable"),
    param: list[str] = typer.Option(None, "--param", help="method parameter key=value; repeatable"),
    out: str = typer.Option(None, "--out", help="output folder (written atomically)"),
    config: Path = typer.Option(None, "--config", help="YAML config with the same fields (see README)"),
    include: list[str] = typer.Option(None, "--include", help="regex of tensors to merge (default: all float)"),
    exclude: list[str] = typer.Option(None, "--exclude", help="regex of tensors not to merge (default: heads)"),
    dtype: str = typer.Option(None, "--dtype", help="output dtype: fp32, fp16, bf16 (default: keep source)"),
    max_shard_size: str = typer.Option(None, "--max-shard-size", help="e.g. 2GB, 500MB"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="merge even if inputs hold NaN/Inf"),
    data: list[str] = typer.Option(None, "--data", help="data-dependent methods: one task data PATH per --model"),
) -> None:
    """Merge fine-tuned checkpoints of one base model into one checkpoint."""
    from mergelab.core.config import load_yaml_config, parse_param, validate_config
    from mergelab.learned.registry import data_method_names
    from mergelab.merging.api import merge
    from mergelab.merging.config import MergeConfig

    if config is None and method in data_method_names():
        _merge_with_data(method, base, model or [], data or [], dict(parse_param(p) for p in (param or [])), out, force)
        return

    if config is not None:
        cfg = load_yaml_config(config, MergeConfig)
        overrides = {"force": force or cfg.force, "allow_nonfinite": allow_nonfinite or cfg.allow_nonfinite}
        cfg = cfg.model_copy(update=overrides)
        if cfg.method in data_method_names():
            _merge_with_data(cfg.method, cfg.base, cfg.models, cfg.data, cfg.params, cfg.out, cfg.force,
                             cfg.max_length, cfg.seed)  # fmt: skip
            return
    else:
        values: dict[str, Any] = {"method": method, "base": base, "models": model or [], "out": out,
                                  "params": dict(parse_param(p) for p in (param or [])), "data": data or []}  # fmt: skip
        for key, value in (("include", include), ("exclude", exclude), ("dtype", dtype),
                           ("max_shard_size", max_shard_size)):  # fmt: skip
            if value:
                values[key] = value
        values.update(force=force, allow_nonfinite=allow_nonfinite)
        cfg = validate_config(values, MergeConfig, "from the command line")
    if cfg.data:
        from mergelab.core.errors import ConfigError

        raise ConfigError(f"--data is only for data-dependent methods ({', '.join(data_method_names())}); "
                          f"'{cfg.method}' merges weights only")
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


def pair_models_with_data(models: list[str], data: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--model`` / ``--data`` values → ({task: checkpoint}, {task: data path}).

    Either every value is ``TASK=PATH`` (paired by task name, in any order) or none is (paired by position, tasks
    named ``task0``, ``task1``, ...).
    """
    from mergelab.core.errors import ConfigError

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
    finetuned, folders = _pairs(models, "--model"), _pairs(data, "--data")
    if len(finetuned) != len(models) or len(folders) != len(data):
        raise ConfigError("a task is named twice in --model or --data; name each task once")
    if set(finetuned) != set(folders):
        raise ConfigError(
            f"--model and --data must name the same tasks; without data: {sorted(set(finetuned) - set(folders))}, "
            f"without a model: {sorted(set(folders) - set(finetuned))}"
        )
    return finetuned, folders


def _merge_with_data(method: str, base: str | None, models: list[str], data: list[str], params: dict[str, Any],
                     out: str | None, force: bool, max_length: int = 64, seed: int = 0) -> None:  # fmt: skip
    """Data-dependent methods from the CLI: each model with its own task's data (the method reads the split it
    declares: train inputs, labelled validation, or test inputs for the transductive AdaMerging)."""
    from mergelab.core.errors import ConfigError
    from mergelab.learned.api import info_as_json, merge_with_data

    if not base or not out:
        raise ConfigError(f"method '{method}' needs --base and --out")
    finetuned, folders = pair_models_with_data(models, data)
    info: dict[str, Any] = {}
    with _progress_bar("merging") as bar:
        bar.add_task(f"{method} (data-dependent)", total=None)
        merge_with_data(method, base, finetuned, folders, out, max_length=max_length, seed=seed, force=force,
                        info=info, **params)  # fmt: skip
    learned = {k: v for k, v in info.items() if k not in ("method",)}
    typer.echo(f"merged {len(finetuned)} model(s) with {method} -> {out}")
    typer.echo("learned/chosen: " + json.dumps(info_as_json(learned), sort_keys=True)[:2000])


@app.command("methods")
@friendly_errors
def methods_command() -> None:
    """List every merging method with its parameters, defaults and docs."""
    from mergelab.merging.registry import list_methods

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
    from mergelab.learned.registry import list_data_methods

    for info in list_data_methods():
        reads = {"train": "unlabelled train inputs", "validation": "labelled validation data",
                 "test": "unlabelled test inputs, transductive"}[info["split"]]  # fmt: skip
        console.print(f"[bold]{info['name']}[/bold] — {info['summary']} (data-dependent, reads {reads}: "
                      "`mergelab merge --data`, bench configs)")  # fmt: skip
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        for column in ("param", "type", "default", "range", "doc"):
            table.add_column(column)
        for row in info["params"]:
            table.add_row(row["name"], row["type"], row["default"], row["range"], row["doc"])
        console.print(table)
        console.print()


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    from mergelab.core.errors import ConfigError

    out = {}
    for value in values or []:
        if "=" not in value:
            raise ConfigError(f"{flag} expects TASK=PATH, got '{value}'")
        task, path = value.split("=", 1)
        out[task.strip()] = path.strip()
    return out


@app.command("eval")
@friendly_errors
def eval_command(
    merged: str = typer.Option(..., "--merged", help="encoder checkpoint to evaluate (merged, or e.g. the base)"),
    finetuned: list[str] = typer.Option(..., "--finetuned", help="TASK=DIR fine-tuned classifier; repeat"),
    data: list[str] = typer.Option(..., "--data", help="TASK=PATH data folder or saved DatasetDict; repeat"),
    protocol: str = typer.Option("current,knn,ft_classifier", "--protocol", help="comma-separated protocols"),
    shots: str = typer.Option("5", "--shots", help="comma-separated shots per class"),
    seeds: int = typer.Option(5, "--seeds", min=1),
    transforms: str = typer.Option("orthogonal,procrustes", "--transforms", help="aligned transform families"),
    out: Path = typer.Option(None, "--out", help="write the rows as a JSON list (atomically)"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="feature cache (default: XDG cache)"),
    max_length: int = typer.Option(128, "--max-length", min=8),
) -> None:
    """Evaluate an encoder on tasks with the paper's protocols; prints tasks × protocols (mean ± std)."""
    import json

    from mergelab.bench.report import aggregate, protocol_label
    from mergelab.core.errors import ConfigError
    from mergelab.evaluate.api import evaluate
    from mergelab.io.writer import atomic_write_text

    try:
        shot_list = [int(k) for k in shots.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--shots must be comma-separated integers, got '{shots}'") from None
    rows = evaluate(
        merged, _pairs(finetuned, "--finetuned"), _pairs(data, "--data"),
        protocols=[p.strip() for p in protocol.split(",") if p.strip()], shots=shot_list, seeds=seeds,
        transforms=[t.strip() for t in transforms.split(",") if t.strip()], cache_dir=cache_dir,
        max_length=max_length,
    )  # fmt: skip
    agg = aggregate([{**r, "method": r["model"]} for r in rows])
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    table = Table(title="accuracy (%) on test, mean ± std over seeds; † transductive")
    for column in ("protocol", "shots", *tasks, "Avg"):
        table.add_column(column)
    for (_, _, name, k), cells in agg.items():
        mark = " †" if any(r["transductive"] for r in rows if r["protocol"] == name) else ""
        table.add_row(protocol_label(name) + mark, str(k), *[cells[c].text() if c in cells else "–" for c in (*tasks, "Avg")])
    _console().print(table)
    if out is not None:
        atomic_write_text(out, json.dumps(rows, indent=1, default=float))
        typer.echo(f"wrote {len(rows)} rows to {out}")


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


@app.command("neulig")
@friendly_errors
def neulig_command(
    model: list[str] = typer.Option(None, "--model", help="a fine-tuned classifier as TASK=PATH; repeat per task"),
    data: list[str] = typer.Option(None, "--data", help="its task's data folder as TASK=PATH (train + test)"),
    loss: str = typer.Option("ce", "--loss", help="ce (labelled train data) or entropy (unlabelled)"),
    steps: int = typer.Option(300, "--steps", help="router training rounds (one batch per task each)"),
    lr: float = typer.Option(1e-3, "--lr"),
    train_examples: int = typer.Option(512, "--train-examples", help="train inputs per task for the router"),
    test_examples: int = typer.Option(None, "--test-examples", help="first N test items per task (default: all)"),
    weights_from: str = typer.Option("first,mean", "--weights-from", help="merge weights of a test batch: first, mean"),
    eval_batch_size: int = typer.Option(16, "--eval-batch-size", help="test items per merged model"),
    max_length: int = typer.Option(64, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", help="also write the per-task results as JSON (atomically)"),
) -> None:
    """NeuLig: train the router over the experts' features, then compare merging with ensembling per task."""
    from mergelab.io.writer import atomic_write_text
    from mergelab.learned.api import neulig_with_data

    finetuned, folders = pair_models_with_data(model or [], data or [])
    rules = [r.strip() for r in weights_from.split(",") if r.strip()]
    report = neulig_with_data(finetuned, folders, loss=loss, steps=steps, lr=lr,  # type: ignore[arg-type]
                              train_examples=train_examples, weights_from=rules, eval_batch_size=eval_batch_size,
                              test_examples=test_examples, max_length=max_length, seed=seed)  # fmt: skip
    table = Table(title="NeuLig: accuracy (%) on test; gap = ensemble − merge (points)")
    for column in ("task", "ensemble", *[f"merge ({r})" for r in rules], *[f"gap ({r})" for r in rules]):
        table.add_column(column)
    tasks = list(report.results)
    for task in [*tasks, "average"]:
        rows = {r: (report.variants[r][task] if task != "average" else report.average_of(r)) for r in rules}
        first = rows[rules[0]]
        table.add_row(task, f"{100 * first['ensemble']:.1f}", *[f"{100 * rows[r]['merge']:.1f}" for r in rules],
                      *[f"{100 * rows[r]['gap']:+.2f}" for r in rules])  # fmt: skip
    _console().print(table)
    if out is not None:
        atomic_write_text(out, json.dumps({"variants": report.variants, "average": {r: report.average_of(r)
                                                                                    for r in rules}}, indent=1))
        typer.echo(f"results: {out}")


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
    _console().print(table)
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
    _console().print(table)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
