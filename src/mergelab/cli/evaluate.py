"""`mergelab eval`: the protocols on one encoder; `mergelab protocols`: every protocol and its options."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from mergelab.cli.common import app, console, friendly_errors, pairs
from mergelab.core.config import DEFAULT_MAX_LENGTH, parse_param
from mergelab.core.errors import ConfigError

# The library (torch, the protocols) is imported when the command runs, as in the other command modules: importing
# mergelab.evaluation.api takes ~3 s (measured), which `mergelab --help` and the other commands should not pay. So the
# help of --option points to `mergelab protocols`, which lists every option from the protocols' options models.
OPTION_HELP = "protocol option PROTOCOL.KEY=VALUE, e.g. knn.chunk_size=512; repeat (every option: `mergelab protocols`)"


@app.command("eval")
@friendly_errors
def eval_command(
    merged: str = typer.Option(..., "--merged", help="encoder checkpoint to evaluate (merged, or e.g. the base)"),
    finetuned: list[str] = typer.Option(..., "--finetuned", help="TASK=DIR fine-tuned classifier; repeat"),
    data: list[str] = typer.Option(..., "--data", help="TASK=PATH data folder or saved DatasetDict; repeat"),
    protocol: str = typer.Option("current,knn,ft_classifier", "--protocol", help="comma-separated protocols"),
    shots: str = typer.Option("5", "--shots", help="comma-separated shots per class"),
    num_seeds: int = typer.Option(5, "--num-seeds", "--seeds", min=1, help="seeds per seeded protocol and shot count"),
    seed: int = typer.Option(0, "--seed", help="the first seed"),
    transforms: str = typer.Option("orthogonal,procrustes", "--transforms", help="aligned transform families"),
    out: Path = typer.Option(None, "--out", help="write the rows as a JSON list (atomically)"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="feature cache (default: XDG cache)"),
    max_length: int = typer.Option(DEFAULT_MAX_LENGTH, "--max-length", min=2, help="tokens per input"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (features and protocols)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16/fp16 autocast on an accelerator"),
    zero_shot_text: str = typer.Option(None, "--zero-shot-text", help="CLIP: the pretrained CLIP whose text tower "
                                       "builds each task's zero-shot head (default: each model's own)"),
    template: list[str] = typer.Option(None, "--template", help="CLIP: a prompt template with {} for the class name; "
                                       "repeatable (default: 'a photo of a {}.')"),
    option: list[str] = typer.Option(None, "--option", help=OPTION_HELP),
    sampling_rate: list[str] = typer.Option(None, "--sampling-rate", help="FT-Classifier also refits on this fraction "
                                            "of the unlabelled test inputs (transductive; CV appendix), e.g. 0.01 or "
                                            "1%; repeatable or comma-separated"),
) -> None:
    """Evaluate an encoder on tasks with the paper's protocols; prints tasks × protocols (mean ± std)."""
    from mergelab.evaluation.api import evaluate
    from mergelab.io.writer import atomic_write_text

    try:
        shot_list = [int(k) for k in shots.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--shots must be comma-separated integers, got '{shots}'") from None
    protocol_options = parse_options(option or [])
    rows = evaluate(
        merged, pairs(finetuned, "--finetuned"), pairs(data, "--data"),
        protocols=[p.strip() for p in protocol.split(",") if p.strip()], shots=shot_list, num_seeds=num_seeds, seed=seed,
        transforms=[t.strip() for t in transforms.split(",") if t.strip()], cache_dir=cache_dir,
        max_length=max_length, protocol_options=protocol_options, device=device, precision=precision,
        zero_shot_text=zero_shot_text, **({"templates": tuple(template)} if template else {}),
        sampling_rates=parse_rates(sampling_rate or []),
    )  # fmt: skip
    console().print(protocol_table(rows))
    if out is not None:
        records = [r if isinstance(r, Mapping) else r.to_dict() for r in rows]
        atomic_write_text(out, json.dumps(records, indent=1, default=float))
        typer.echo(f"wrote {len(rows)} rows to {out}")


def parse_rates(values: list[str]) -> list[float]:
    """``--sampling-rate`` values (repeated and/or comma-separated; ``0.01`` or ``1%``) as fractions of the test
    set; anything else is a one-line ConfigError."""
    rates = []
    for text in (part.strip() for value in values for part in value.split(",")):
        if not text:
            continue
        try:
            rates.append(float(text[:-1]) / 100 if text.endswith("%") else float(text))
        except ValueError:
            raise ConfigError(f"--sampling-rate must be a fraction like 0.01 or a percentage like 1%, got '{text}'") from None
    return rates


def parse_options(values: list[str]) -> dict[str, dict[str, Any]]:
    """``--option PROTOCOL.KEY=VALUE`` values as {protocol: {key: value}} (values parsed as YAML scalars), each
    protocol's checked by its options model (a one-line ConfigError names the protocol and the option)."""
    from mergelab.evaluation.protocols.registry import validate_protocol_options

    options: dict[str, dict[str, Any]] = {}
    for text in values:
        target, value = parse_param(text) if "=" in text else ("", None)
        protocol, dot, key = target.partition(".")
        if not (protocol and dot and key):
            raise ConfigError(f"--option '{text}' must look like PROTOCOL.KEY=VALUE, e.g. --option knn.chunk_size=512")
        options.setdefault(protocol, {})[key] = value
    return {protocol: validate_protocol_options(protocol, given) for protocol, given in options.items()}


@app.command("protocols")
@friendly_errors
def protocols_command() -> None:
    """List every evaluation protocol: what it does, whether it is transductive, and its options (`eval --option`)."""
    from mergelab.evaluation.protocols.common import describe_options
    from mergelab.evaluation.protocols.registry import protocol_infos

    out = console()
    for info in protocol_infos().values():
        mark = "transductive: fitted on the scored inputs" if info.transductive else "not transductive"
        out.print(Text.assemble((info.name, "bold"), f" — {info.summary} ({mark})"))
        rows = describe_options(info.options)
        if not rows:
            out.print("  no options")
        else:
            out.print(options_table(rows))
        out.print()


def options_table(rows: list[dict[str, str]]) -> Table:
    """One line per option: name, type, default, accepted values (range) and description."""
    table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
    for column in ("option", "type", "default", "range", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(row[k]) for k in ("name", "type", "default", "accepts", "doc")))
    return table


def protocol_table(rows: Iterable[Any]) -> Table:
    """One line per (protocol, shots) in the order evaluated: each task's and the task average's mean ± std over
    seeds, from the one summary (``mergelab.evaluation.results.summarize``); † marks transductive protocols."""
    from mergelab.bench.report import protocol_label
    from mergelab.bench.report.model import stat_cell
    from mergelab.evaluation.results import as_rows, split_rate, summarize

    checked = as_rows({"method": r["model"], "params": {}, **r} if isinstance(r, Mapping) else r for r in rows)
    summary = summarize(checked)
    tasks = list(dict.fromkeys(r.task for r in checked))
    lines = dict.fromkeys((r.model, r.method, r.protocol, r.shots) for r in checked)
    table = Table(title="accuracy (%) on test, mean ± std over seeds; † transductive")
    for column in ("protocol", "shots / rate", *tasks, "Avg"):
        table.add_column(column)
    for model, method, name, k in lines:
        group = summary.find(model, method, name, k)
        if group is None:
            continue
        mark = " †" if any(r.transductive for r in checked if r.protocol == name) else ""
        base, rate = split_rate(name)  # a sampling-rate cell shows its rate in the shots column
        table.add_row(protocol_label(base) + mark, rate or str(k),
                      *[stat_cell(group.get(c)).text for c in (*tasks, "average")])  # fmt: skip
    return table
