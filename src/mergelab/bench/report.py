"""The report: the paper's Table 2/3 layout, Figures 1/4/5, the chosen hyper-parameters and the run's facts.

Everything here reads the results store (and the t-SNE coordinates saved by the runner); it computes nothing
new, so the report's numbers are the store's numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from mergelab.bench.store import ResultStore
from mergelab.io.writer import atomic_write_text

PROTOCOL_NAMES = {
    "current": "Current", "knn": "KNN", "ft_classifier": "FT-Classifier", "linear_probe": "Linear probe",
    "ensemble": "Ensemble", "surgery": "Surgery",
}  # fmt: skip


def protocol_label(protocol: str) -> str:
    if protocol.startswith("aligned:"):
        return f"Aligned ({protocol.split(':', 1)[1]})"
    return PROTOCOL_NAMES.get(protocol, protocol)


@dataclass(frozen=True)
class Cell:
    """mean ± std (population std over seeds, as a percentage) of one (row, task)."""

    mean: float
    std: float
    n: int

    def text(self) -> str:
        if self.n > 1:
            return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"
        return f"{100 * self.mean:.1f}"


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Cell]]:
    """(model, method, protocol, shots) → task → Cell over seeds; plus an 'Avg' over tasks (per seed, then mean)."""
    by_key: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        key = (row["model"], row["method"], row["protocol"], row["shots"])
        by_key[key][row["task"]][row["seed"]] = row["accuracy"]
    out: dict[tuple, dict[str, Cell]] = {}
    for key, tasks in by_key.items():
        cells = {task: _cell(list(seeds.values())) for task, seeds in tasks.items()}
        common_seeds = set.intersection(*(set(s) for s in tasks.values()))
        if common_seeds:
            per_seed = [mean(tasks[t][s] for t in tasks) for s in sorted(common_seeds)]
            cells["Avg"] = _cell(per_seed)
        out[key] = cells
    return out


def _cell(values: list[float]) -> Cell:
    return Cell(mean(values), pstdev(values) if len(values) > 1 else 0.0, len(values))


def table_shots(rows: list[dict[str, Any]], preferred: int = 5) -> int:
    shots = sorted({r["shots"] for r in rows if r["protocol"] in ("knn", "ft_classifier")})
    if not shots:
        return 0
    return preferred if preferred in shots else shots[-1]


def main_table(rows: list[dict[str, Any]], tasks: list[str], shots: int,
               methods: list[str] | None = None) -> list[tuple[str, list[str], bool]]:  # fmt: skip
    """Rows of Table 2 (+ Table 3's pretrained rows and the ensemble): (label, cells, transductive)."""
    agg = aggregate(rows)
    columns = [*tasks, "Avg"]

    def line(label: str, key: tuple) -> tuple[str, list[str], bool] | None:
        cells = agg.get(key)
        if not cells:
            return None
        transductive = any(r["transductive"] for r in rows if (r["model"], r["method"], r["protocol"], r["shots"]) == key)
        return label, [cells[c].text() if c in cells else "–" for c in columns], transductive

    out = []
    candidates = [("Fine-tuned (individual)", ("finetuned", "individual", "current", 0)),
                  ("Multi-task learning", ("mtl", "mtl", "current", 0))]  # fmt: skip
    for method in method_order(rows, methods):
        candidates += [
            (method, ("merged", method, "current", 0)),
            (f"{method} + KNN ({shots}-shot)", ("merged", method, "knn", shots)),
            (f"{method} + FT-Classifier ({shots}-shot)", ("merged", method, "ft_classifier", shots)),
        ]
    candidates += [
        ("Pretrained (Current)", ("pretrained", "pretrained", "current", 0)),
        (f"Pretrained + KNN ({shots}-shot)", ("pretrained", "pretrained", "knn", shots)),
        (f"Pretrained + FT-Classifier ({shots}-shot)", ("pretrained", "pretrained", "ft_classifier", shots)),
        ("Ensemble of the fine-tuned encoders (features)", ("ensemble", "ensemble", "ensemble", 0)),
    ]
    for label, key in candidates:
        built = line(label, key)
        if built:
            out.append(built)
    return out


def method_order(rows: list[dict[str, Any]], preferred: list[str] | None = None) -> list[str]:
    """Merged methods in the config's order (``preferred``), then any others in row order."""
    seen: list[str] = [m for m in (preferred or []) if any(r["model"] == "merged" and r["method"] == m for r in rows)]
    for row in rows:
        if row["model"] == "merged" and row["method"] not in seen:
            seen.append(row["method"])
    return seen


def config_methods(config: dict[str, Any] | None) -> list[str]:
    """Display names of the configured methods, in config order."""
    return [m.get("label") or m["name"] for m in (config or {}).get("methods", [])]


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def task_order(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["task"] not in seen:
            seen.append(row["task"])
    return seen


# ----------------------------------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def figure_aligned(rows: list[dict[str, Any]]) -> bytes | None:
    """Figure 4: average accuracy of each aligned transform per method, beside Current and fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    methods = [m for m in method_order(rows) if any(k[1] == m and k[2].startswith("aligned:") for k in agg)]
    if not methods:
        return None
    transforms = sorted({k[2] for k in agg if k[2].startswith("aligned:")})
    bars = ["current", *transforms]
    finetuned = agg.get(("finetuned", "individual", "current", 0), {}).get("Avg")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(methods) * len(bars) / 3), 4))
    width = 0.8 / len(bars)
    for j, protocol in enumerate(bars):
        values = [100 * agg.get(("merged", m, protocol, 0), {}).get("Avg", Cell(math.nan, 0, 0)).mean for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], values, width, label=protocol_label(protocol))
    if finetuned:
        ax.axhline(100 * finetuned.mean, color="black", linestyle="--", label="Fine-tuned")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods)
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Aligned transforms (transductive: fitted on unlabelled test inputs)")
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def figure_shots(rows: list[dict[str, Any]]) -> bytes | None:
    """Figure 5: average accuracy against shots for Current (flat), KNN and FT-Classifier, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    methods = [m for m in method_order(rows) if any(k[1] == m and k[2] in ("knn", "ft_classifier") for k in agg)]
    if not methods:
        return None
    cols = min(4, len(methods))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        current = agg.get(("merged", method, "current", 0), {}).get("Avg")
        for protocol, style in (("knn", "o-"), ("ft_classifier", "s-")):
            points = sorted((k[3], c["Avg"]) for k, c in agg.items()
                            if k[:3] == ("merged", method, protocol) and "Avg" in c)  # fmt: skip
            if points:
                ax.errorbar([p[0] for p in points], [100 * p[1].mean for p in points],
                            yerr=[100 * p[1].std for p in points], fmt=style, label=protocol_label(protocol),
                            capsize=2)  # fmt: skip
        if current:
            ax.axhline(100 * current.mean, color="gray", linestyle="--", label="Current")
        ax.set_title(method, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes[0][0].set_ylabel("average accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def surgery_series(rows: list[dict[str, Any]]) -> tuple[list[str], list[int], dict[tuple[str, str, int], float]]:
    """(methods, shot counts, {(method, protocol, k): average accuracy}) for FT-Classifier vs Surgery; k = 0 is
    Surgery on every eval input."""
    agg = aggregate(rows)
    methods = [m for m in method_order(rows) if ("merged", m, "surgery", 0) in agg]
    shots = sorted({k[3] for k in agg if k[2] == "surgery" and k[3] > 0})
    values = {(m, p, k): agg[("merged", m, p, k)]["Avg"].mean for m in methods for p in ("ft_classifier", "surgery")
              for k in [0, *shots] if ("merged", m, p, k) in agg and "Avg" in agg[("merged", m, p, k)]}  # fmt: skip
    return methods, shots, values


def figure_surgery(rows: list[dict[str, Any]]) -> bytes | None:
    """Figure 7: FT-Classifier and Representation Surgery against the number of unlabelled samples (k per class),
    averaged over the merged models (thin lines: each model), with Surgery on every test input for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, shots, values = surgery_series(rows)
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"ft_classifier": ("C0", "FT-Classifier"), "surgery": ("C3", "Surgery †")}
    for protocol, (color, label) in styles.items():
        for method in methods:
            ys = [100 * values.get((method, protocol, k), math.nan) for k in shots]
            ax.plot(shots, ys, color=color, alpha=0.2, linewidth=0.8)
        means = [100 * mean(values[(m, protocol, k)] for m in methods if (m, protocol, k) in values) if any(
            (m, protocol, k) in values for m in methods) else math.nan for k in shots]  # fmt: skip
        ax.plot(shots, means, color=color, marker="o", linewidth=2, label=f"{label} (mean over models)")
    full = [values[(m, "surgery", 0)] for m in methods if (m, "surgery", 0) in values]
    if full:
        ax.axhline(100 * mean(full), color="C3", linestyle=":", label="Surgery † on every test input")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("unlabelled samples per class (k)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("FT-Classifier vs Representation Surgery at equal sample counts")
    ax.legend(fontsize=7)
    return _png(fig)


def surgery_table(rows: list[dict[str, Any]]) -> str:
    """Figure 7's numbers: per merged model, FT-Classifier / Surgery at each k, and Surgery on every test input."""
    methods, shots, values = surgery_series(rows)
    if not methods:
        return ""
    lines = []
    for method in methods:
        cells = []
        for k in shots:
            ft, sg = values.get((method, "ft_classifier", k)), values.get((method, "surgery", k))
            cells.append(f"{100 * ft:.1f} / {100 * sg:.1f}" if ft is not None and sg is not None else "–")
        full = values.get((method, "surgery", 0))
        lines.append([method, *cells, f"{100 * full:.1f}" if full is not None else "–"])
    header = ["model", *[f"k={k}: FT-Cl / Surgery †" for k in shots], "Surgery † (all test inputs)"]
    return markdown_table(header, lines)


def figure_tsne(run_dir: Path) -> bytes | None:
    """Figure 1: t-SNE of fine-tuned vs merged test features, coloured by label (saved by the runner)."""
    path = run_dir / "tsne.json"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    panels = data["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for kind, marker, alpha in (("finetuned", "o", 0.5), ("merged", "^", 0.5)):
            xy = panel[kind]
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=panel["labels"], cmap="tab20", marker=marker,
                       s=9, alpha=alpha, label=f"{kind} ({'●' if marker == 'o' else '▲'})")  # fmt: skip
        ax.set_title(f"{panel['task']}: fine-tuned ● vs {data['method']} merged ▲", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


# ----------------------------------------------------------------------------------------------------- report


def build_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html (plots embedded) and the PNG figures into ``run_dir``."""
    run_dir = Path(run_dir)
    with ResultStore(run_dir / "results.sqlite") as store:
        rows = store.rows("test")
        meta = {key: store.get_meta(key)
                for key in ("config", "chosen", "selection", "provenance", "versions", "timings", "learned")}  # fmt: skip
    if not rows:
        from mergelab.errors import MergelabError

        raise MergelabError(f"no results in {run_dir}; run `mergelab bench CONFIG --out {run_dir}` first")
    tasks = task_order(rows)
    shots = table_shots(rows)
    table = main_table(rows, tasks, shots, config_methods(meta.get("config")))
    header = ["", *tasks, "Avg"]
    md_lines = [[label + (" †" if transductive else ""), *cells] for label, cells, transductive in table]
    figures = {"fig4_aligned.png": figure_aligned(rows), "fig5_shots.png": figure_shots(rows),
               "fig1_tsne.png": figure_tsne(run_dir), "fig7_surgery.png": figure_surgery(rows)}  # fmt: skip
    for name, data in figures.items():
        if data:
            (run_dir / name).write_bytes(data)
    other = other_protocols_table(rows, tasks)
    sections = [
        "# mergelab benchmark report",
        f"Accuracy (%) on the test split, mean ± std over seeds; few-shot rows use {shots} shots per class. "
        "† marks transductive rows (fitted on unlabelled test inputs).",
        "## Table 2 (+ Table 3's pretrained rows and the ensemble)",
        markdown_table(header, md_lines),
    ]
    if other:
        sections += ["## Every protocol (average over tasks)", other]
    surgery = surgery_table(rows)
    if surgery:
        sections += ["## Figure 7: FT-Classifier vs Representation Surgery (average accuracy %, equal unlabelled "
                     "samples: k per class × classes)", surgery]
    neulig = neulig_table(rows, tasks)
    if neulig:
        sections += ["## NeuLig: merging vs ensembling (router trained on the experts' train features)", neulig]
    sections += ["## Hyper-parameters chosen on the validation split", chosen_table(meta.get("chosen") or {},
                                                                                     meta.get("selection") or {})]
    if meta.get("learned"):
        sections += ["## What the data-dependent merges learned or chose", learned_table(meta["learned"])]
    sections += ["## Run facts", facts(meta)]
    md = "\n\n".join(sections) + "\n"
    md_with_figs = md + "\n" + "\n".join(f"![{name}]({name})" for name, data in figures.items() if data) + "\n"
    atomic_write_text(run_dir / "report.md", md_with_figs)
    atomic_write_text(run_dir / "report.html", render_html(md, figures))
    return {"markdown": run_dir / "report.md", "html": run_dir / "report.html"}


def other_protocols_table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    agg = aggregate(rows)
    lines = []
    for key in sorted(agg, key=lambda k: (k[0], k[1], k[2], k[3])):
        model, method, protocol, shots = key
        transductive = any(r["transductive"] for r in rows if (r["model"], r["method"], r["protocol"], r["shots"]) == key)
        cells = agg[key]
        lines.append([model, method, protocol_label(protocol) + (" †" if transductive else ""), str(shots),
                      *[cells[t].text() if t in cells else "–" for t in tasks], cells["Avg"].text() if "Avg" in cells else "–"])  # fmt: skip
    return markdown_table(["model", "method", "protocol", "shots", *tasks, "Avg"], lines) if lines else ""


def neulig_table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """Ensembling and merging accuracy of the NeuLig router per task, the gap and the mean largest merge weight."""
    agg = aggregate([r for r in rows if r["model"] == "neulig"])
    if not agg:
        return ""
    ensemble = agg.get(("neulig", "ensemble", "current", 0), {})
    lines = []
    for key in sorted(agg, key=lambda k: (k[1] != "ensemble", k[1])):
        cells = agg[key]
        extras = [r["extras"] for r in rows if (r["model"], r["method"], r["protocol"], r["shots"]) == key]
        gap = top = "–"
        if key[1] != "ensemble" and "Avg" in cells and "Avg" in ensemble:
            gap = f"{100 * (ensemble['Avg'].mean - cells['Avg'].mean):+.2f}"
            tops = [float(e["top_weight"]) for e in extras if isinstance(e, dict) and "top_weight" in e]
            top = f"{mean(tops):.3f}" if tops else "–"
        lines.append([key[1], *[cells[t].text() if t in cells else "–" for t in tasks],
                      cells["Avg"].text() if "Avg" in cells else "–", gap, top])  # fmt: skip
    note = ("Gap = ensemble − merge (points, average over tasks); the seed paper reports 95.46 vs 95.44 (0.02). "
            "Top weight = mean over test batches of the largest merge weight (1.0: the merge is one expert).")
    return markdown_table(["NeuLig", *tasks, "Avg", "gap (pt)", "top weight"], lines) + "\n\n" + note


def learned_table(learned: dict[str, Any], width: int = 400) -> str:
    """One line per data-dependent merge: what it learned or chose (λ_t, coefficients, kept fraction, ...)."""
    lines = []
    for name, info in learned.items():
        text = json.dumps({k: v for k, v in info.items() if k != "method"}, sort_keys=True)
        lines.append([name, text if len(text) <= width else text[: width - 1] + "…"])
    return markdown_table(["method (params)", "learned / chosen"], lines)


def chosen_table(chosen: dict[str, Any], selection: dict[str, Any]) -> str:
    if not chosen:
        return "No grid search in this run (every method used its fixed parameters)."
    lines = []
    for method, params in chosen.items():
        tried = selection.get(method, [])
        scores = ", ".join(f"{json.dumps(t['params'], sort_keys=True)}: {100 * t['score']:.1f}" for t in tried)
        lines.append([method, json.dumps(params, sort_keys=True), scores or "–"])
    return markdown_table(["method", "chosen", "validation score of each candidate (%)"], lines)


def facts(meta: dict[str, Any]) -> str:
    cfg = meta.get("config") or {}
    lines = [
        f"- seeds: {cfg.get('seeds')}; shots: {cfg.get('shots')}; protocols: {cfg.get('protocols')}; "
        f"transforms: {cfg.get('transforms')}",
        f"- selection: grid values chosen on the **{cfg.get('select_on')}** split by "
        f"**{cfg.get('select_protocol')}** (never on test)",
    ]
    for task, info in (meta.get("provenance") or {}).items():
        lines.append(f"- data `{task}`: {json.dumps(info, sort_keys=True)}")
    if meta.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    if meta.get("timings"):
        lines.append("- timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in meta["timings"].items()))
    return "\n".join(lines)


def render_html(markdown_text: str, figures: dict[str, bytes | None]) -> str:
    """A self-contained page: the Markdown tables rendered as HTML, the figures embedded as base64 PNG."""
    body = []
    in_table = False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    for name, data in figures.items():
        if data:
            encoded = base64.b64encode(data).decode()
            body.append(f"<h2>{html.escape(name)}</h2><img alt='{name}' src='data:image/png;base64,{encoded}'>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}img{max-width:100%}")  # fmt: skip
    return f"<!doctype html><html><head><meta charset='utf-8'><title>mergelab report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
