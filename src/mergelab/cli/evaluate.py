"""`mergelab eval`: the protocols on one encoder."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mergelab.cli.common import app, console, friendly_errors, pairs


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

    from mergelab.bench.report import aggregate, protocol_label
    from mergelab.core.errors import ConfigError
    from mergelab.evaluate.api import evaluate
    from mergelab.io.writer import atomic_write_text

    try:
        shot_list = [int(k) for k in shots.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--shots must be comma-separated integers, got '{shots}'") from None
    rows = evaluate(
        merged, pairs(finetuned, "--finetuned"), pairs(data, "--data"),
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
    console().print(table)
    if out is not None:
        atomic_write_text(out, json.dumps(rows, indent=1, default=float))
        typer.echo(f"wrote {len(rows)} rows to {out}")
