"""`mergelab merge`, `mergelab methods`, `mergelab neulig`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mergelab.cli.common import app, console, friendly_errors, pair_models_with_data, progress_bar


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
    with progress_bar("merging") as bar:
        task = bar.add_task(f"{cfg.method}", total=None)

        def report(phase: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{cfg.method}: {phase}")

        result = merge(
            cfg.method, cfg.base, cfg.models, cfg.out, include=cfg.include, exclude=cfg.exclude, dtype=cfg.dtype,
            max_shard_size=cfg.max_shard_size, force=cfg.force, allow_nonfinite=cfg.allow_nonfinite,
            progress=report, **cfg.params,
        )  # fmt: skip
    typer.echo(f"merged {len(cfg.models)} model(s) with {cfg.method} -> {result}")


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
    with progress_bar("merging") as bar:
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

    out = console()
    for info in list_methods():
        flags = [] if info["needs_base"] else ["no base needed"]
        if info["transductive"]:
            flags.append("transductive")
        out.print(f"[bold]{info['name']}[/bold] — {info['summary']}" + (f" ({', '.join(flags)})" if flags else ""))
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        for column in ("param", "type", "default", "range", "doc"):
            table.add_column(column)
        for row in info["params"]:
            table.add_row(row["name"], row["type"], row["default"], row["range"], row["doc"])
        out.print(table)
        out.print()
    from mergelab.learned.registry import list_data_methods

    for info in list_data_methods():
        reads = {"train": "unlabelled train inputs", "validation": "labelled validation data",
                 "test": "unlabelled test inputs, transductive"}[info["split"]]  # fmt: skip
        out.print(f"[bold]{info['name']}[/bold] — {info['summary']} (data-dependent, reads {reads}: "
                      "`mergelab merge --data`, bench configs)")  # fmt: skip
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        for column in ("param", "type", "default", "range", "doc"):
            table.add_column(column)
        for row in info["params"]:
            table.add_row(row["name"], row["type"], row["default"], row["range"], row["doc"])
        out.print(table)
        out.print()


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
    console().print(table)
    if out is not None:
        atomic_write_text(out, json.dumps({"variants": report.variants, "average": {r: report.average_of(r)
                                                                                    for r in rules}}, indent=1))
        typer.echo(f"results: {out}")
