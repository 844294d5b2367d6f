"""`mergelab merge`, `mergelab methods`, `mergelab neulig`.

Library imports sit inside the commands: the library pulls in torch (~1.3 s) and the config helpers pydantic and
yaml (~0.2 s), which `mergelab --help` and `mergelab --version` skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mergelab.cli.common import app, console, friendly_errors, pair_models_with_data, pairs, progress_bar
from mergelab.core.config import DEFAULT_MAX_LENGTH


@app.command("merge")
@friendly_errors
def merge_command(
    method: str = typer.Option(None, "--method", help="merging method (see `mergelab methods`)"),
    base: str = typer.Option(None, "--base", help="pretrained base checkpoint (HF folder or weights file)"),
    model: list[str] = typer.Option(None, "--model", help="a fine-tuned checkpoint or LoRA adapter folder "
                                    "(TASK=PATH to name its task); repeatable"),  # fmt: skip
    param: list[str] = typer.Option(None, "--param", help="method parameter key=value; repeatable"),
    out: str = typer.Option(None, "--out", help="output folder (written atomically)"),
    config: Path = typer.Option(None, "--config", help="YAML config with the same fields (see README)"),
    include: list[str] = typer.Option(None, "--include", help="regex of tensors to merge (default: all float)"),
    exclude: list[str] = typer.Option(None, "--exclude", help="regex of tensors not to merge (default: heads)"),
    dtype: str = typer.Option(None, "--dtype", help="output dtype: fp32, fp16, bf16 (default: keep source)"),
    max_shard_size: str = typer.Option(None, "--max-shard-size", help="e.g. 2GB, 500MB"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="merge even if inputs hold NaN/Inf"),
    data: list[str] = typer.Option(None, "--data", help="data-dependent methods: each --model's task data "
                                   "(TASK=PATH, or PATH in --model order)"),  # fmt: skip
    device: str = typer.Option(None, "--device", help="data-dependent methods: where the models run on the data: "
                               "auto (default: CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps"),  # fmt: skip
) -> None:
    """Merge fine-tuned checkpoints of one base model into one checkpoint (any method of `mergelab methods`)."""
    from mergelab.api import merge  # lazy: torch, pydantic (module doc)
    from mergelab.api.config import MergeConfig
    from mergelab.core.config import load_yaml_config, parse_param, validate_config
    from mergelab.core.memory import retain_freed_memory

    retain_freed_memory()  # this process is the merge's own: outputs reuse freed heap memory (core/memory.py)
    if config is not None:
        cfg = load_yaml_config(config, MergeConfig)
        flags = {"force": force or cfg.force, "allow_nonfinite": allow_nonfinite or cfg.allow_nonfinite}
        cfg = cfg.model_copy(update=flags)
    else:
        values = {"method": method, "base": base, "models": model or [], "out": out, "data": data or [],
                  "params": dict(parse_param(p) for p in (param or [])), "include": include or None,
                  "exclude": exclude or None, "dtype": dtype, "max_shard_size": max_shard_size, "force": force,
                  "allow_nonfinite": allow_nonfinite}  # fmt: skip
        cfg = validate_config(values, MergeConfig, "from the command line")
    with progress_bar("merging") as bar:
        task = bar.add_task(cfg.method, total=None)

        def report(phase: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{cfg.method}: {phase}")

        result = merge(cfg.method, cfg.base, task_inputs(cfg.models, "--model"),
                       data=task_inputs(cfg.data, "--data") or None, out=cfg.out, progress=report, device=device,
                       **{**cfg.params, **cfg.options()})  # fmt: skip
    typer.echo(f"merged {len(cfg.models)} model(s) with {cfg.method} -> {result.path}")
    learned = {k: v for k, v in result.record().items() if k != "method"}
    if learned:
        typer.echo("learned/chosen: " + json.dumps(learned, sort_keys=True)[:2000])


def task_inputs(values: list[str], flag: str) -> dict[str, str] | list[str]:
    """``TASK=PATH`` values as {task: path} when every value names its task, else the paths in order."""
    if values and all("=" in v for v in values):
        named = pairs(values, flag)
        if len(named) == len(values):
            return named
    return list(values)


@app.command("methods")
@friendly_errors
def methods_command() -> None:
    """List every method: what it reads and produces, how to run it, its parameters, defaults and docs."""
    from mergelab.api import list_methods  # lazy: torch, pydantic (module doc)
    from mergelab.merging.spec import PRODUCES_TEXT, describe_params

    out = console()
    for spec in list_methods():
        flags = [f"reads {spec.describe_reads()}"]
        if not spec.needs_base:
            flags.append("no base needed")
        if spec.min_models > 1:
            flags.append(f"at least {spec.min_models} models")
        if spec.produces != "merged_model":
            flags.append(f"produces {PRODUCES_TEXT[spec.produces]}")
        out.print(f"[bold]{spec.name}[/bold] — {spec.summary} ({'; '.join(flags)}; run: {spec.run_with})")
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        for column in ("param", "type", "default", "range", "doc"):
            table.add_column(column)
        for row in describe_params(spec.params):
            table.add_row(row["name"], row["type"], row["default"], row["range"], row["doc"])
        out.print(table)
        out.print()


@app.command("neulig")
@friendly_errors
def neulig_command(
    model: list[str] = typer.Option(None, "--model", help="a fine-tuned classifier as TASK=PATH; repeat per task"),
    data: list[str] = typer.Option(None, "--data", help="its task's data folder as TASK=PATH (train + test)"),
    loss: str = typer.Option(None, "--loss", help="ce (labelled train data) or entropy (unlabelled)"),
    steps: int = typer.Option(None, "--steps", help="router training rounds, one batch per task each"),
    lr: float = typer.Option(None, "--lr", help="router learning rate"),
    batch_size: int = typer.Option(None, "--batch-size", help="train features per task per step"),
    train_examples: int = typer.Option(None, "--train-examples", help="train inputs per task"),
    test_examples: int = typer.Option(None, "--test-examples", help="first N test items per task (default: all)"),
    weights_from: str = typer.Option(None, "--weights-from", help="merge weights of a test batch: first and/or mean"),
    eval_batch_size: int = typer.Option(None, "--eval-batch-size", help="test items per merged model"),
    seed: int = typer.Option(None, "--seed", help="router init, batches, train sample"),
    max_length: int = typer.Option(DEFAULT_MAX_LENGTH, "--max-length", help="tokens per input"),
    out: Path = typer.Option(None, "--out", help="also write the per-task results as JSON (atomically)"),
    device: str = typer.Option("auto", "--device", help="where the encoders run: auto (CUDA, else MPS, else CPU), "
                               "cpu, cuda, cuda:N, mps (the router trains on the CPU)"),  # fmt: skip
) -> None:
    """NeuLig: train the router over the experts' features, then compare merging with ensembling per task.

    Unset options take the defaults of NeuLigOptions, the benchmark's (`mergelab methods` lists them under neulig)."""
    from mergelab.io.writer import atomic_write_text  # lazy: torch, pydantic (module doc)
    from mergelab.learned.api import neulig_with_data

    finetuned, folders = pair_models_with_data(model or [], data or [])
    rules = [r.strip() for r in weights_from.split(",") if r.strip()] if weights_from is not None else None
    given = {"loss": loss, "steps": steps, "lr": lr, "batch_size": batch_size, "train_examples": train_examples,
             "test_examples": test_examples, "weights_from": rules, "eval_batch_size": eval_batch_size, "seed": seed}
    report = neulig_with_data(finetuned, folders, {k: v for k, v in given.items() if v is not None},
                              max_length=max_length, device=device)  # fmt: skip
    console().print(_neulig_table(report))
    if out is not None:
        averages = {rule: report.average_of(rule) for rule in report.variants}
        atomic_write_text(out, json.dumps({"variants": report.variants, "average": averages}, indent=1))
        typer.echo(f"results: {out}")


def _neulig_table(report: Any) -> Table:
    """Per task: ensemble accuracy, merge accuracy and gap for every ``weights_from`` rule, then the average."""
    rules = list(report.variants)
    table = Table(title="NeuLig: accuracy (%) on test; gap = ensemble − merge (points)")
    for column in ("task", "ensemble", *[f"merge ({r})" for r in rules], *[f"gap ({r})" for r in rules]):
        table.add_column(column)
    for task in [*report.results, "average"]:
        rows = {r: (report.variants[r][task] if task != "average" else report.average_of(r)) for r in rules}
        first = rows[rules[0]]
        table.add_row(task, f"{100 * first['ensemble']:.1f}", *[f"{100 * rows[r]['merge']:.1f}" for r in rules],
                      *[f"{100 * rows[r]['gap']:+.2f}" for r in rules])  # fmt: skip
    return table
