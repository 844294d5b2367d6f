"""The report's figures as PNG bytes: Figure 4 (aligned maps), 5 (accuracy against shots), 1 (t-SNE),
7 (FT-Classifier vs Surgery) and the experts' train loss. Each returns None when the run has no data for it."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from statistics import mean
from typing import Any

from mergelab.bench.report.labels import protocol_label
from mergelab.bench.report.run import RowLike, RunResults, as_results
from mergelab.bench.report.tables import aligned_series, surgery_series
from mergelab.evaluation.results import ModelKind

ALIGNED_STYLES = [  # (fit, control, legend label, bar style)
    ("cross-fitted", False, "cross-fitted", {"color": "C0"}),
    (
        "cross-fitted",
        True,
        "shuffled-pairs control (cross-fitted)",
        {"color": "0.75", "hatch": "//", "edgecolor": "0.4"},
    ),
    ("in-sample", False, "in-sample (fit = scored items)", {"color": "C1", "alpha": 0.6}),
    ("in-sample", True, "shuffled-pairs control (in-sample)", {"color": "0.9", "hatch": "..", "edgecolor": "0.5"}),
]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use: the import takes ~0.9 s (measured), which
    commands that draw nothing should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (110 dpi); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def bottom_legend(fig: Any, ax: Any) -> None:
    """One legend for every panel (they share their lines), under the figure where it hides no data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(5, len(labels)),
        fontsize=8,
        frameon=False,
    )


def figure_aligned(rows: RunResults | Iterable[RowLike]) -> bytes | None:
    """Figure 4: per merged method, each aligned family's cross-fitted accuracy with its shuffled-pairs noise
    control beside it (grey, hatched), in-sample fits (if run) labelled as such, and the fine-tuned bound, the
    method's Current accuracy and chance (majority-class rate) as lines."""
    results = as_results(rows)
    methods, families, values, chance = aligned_series(results)
    if not methods:
        return None
    styles = [s for s in ALIGNED_STYLES if any((m, f, s[0], s[1]) in values for m in methods for f in families)]
    panel = max(3.0, 0.3 * len(families) * len(styles) + 1.2)
    cols = max(1, min(3, len(methods), int(13 // panel)))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = pyplot().subplots(rows_n, cols, figsize=(panel * cols, 3.4 * rows_n), squeeze=False, sharey=True)
    width = 0.8 / len(styles)
    for ax, method in zip(axes.flat, methods, strict=False):
        for j, (fit, control, label, style) in enumerate(styles):
            ys = [100 * values.get((method, f, fit, control), math.nan) for f in families]
            ax.bar([i + j * width for i in range(len(families))], ys, width, label=label, **style)
        _aligned_lines(ax, results, method, chance.get(method))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(families))], families, rotation=45, fontsize=8)
        ax.set_title(method, fontsize=9)
    return finish_grid(fig, axes, len(methods))


def finish_grid(fig: Any, axes: Any, used: int) -> bytes:
    """Hide the unused panels of a grid of per-method panels, label the y axes, put one legend below, as PNG."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    for line in axes:
        line[0].set_ylabel("average accuracy (%)")
    fig.tight_layout()
    bottom_legend(fig, axes[0][0])
    return png(fig)


def _aligned_lines(ax: Any, results: RunResults, method: str, chance: float | None) -> None:
    """Figure 4's reference lines: the fine-tuned bound, the method's Current accuracy, chance."""
    finetuned = results.average(ModelKind.FINETUNED, "individual", "current")
    current = results.average(ModelKind.MERGED, method, "current")
    if finetuned:
        ax.axhline(100 * finetuned.mean, color="black", linestyle="--", linewidth=1, label="fine-tuned bound")
    if current:
        ax.axhline(100 * current.mean, color="C3", linestyle="-.", linewidth=1, label="Current (no map)")
    if chance is not None:
        ax.axhline(100 * chance, color="0.3", linestyle=":", linewidth=1, label="chance (majority class)")


def figure_shots(rows: RunResults | Iterable[RowLike]) -> bytes | None:
    """Figure 5: average accuracy against shots for Current (flat), KNN and FT-Classifier (reference schedule and
    converged), per method; error bars = std over seeds."""
    results = as_results(rows)
    few = ("knn", "ft_classifier", "ft_classifier:converged")
    methods = [
        m
        for m in results.methods
        if any(results.summary.select(model=ModelKind.MERGED, method=m, protocol=p) for p in few)
    ]
    if not methods:
        return None
    cols = min(4, len(methods))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = pyplot().subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False, sharey=True)
    all_shots: set[int] = set()
    for ax, method in zip(axes.flat, methods, strict=False):
        for protocol, style in zip(few, ("o-", "s-", "^--"), strict=True):
            groups = sorted(
                results.summary.select(model=ModelKind.MERGED, method=method, protocol=protocol),
                key=lambda g: g.key.shots,
            )
            if groups:
                xs = [g.key.shots for g in groups]
                all_shots.update(xs)
                ys, errors = [100 * g.average.mean for g in groups], [100 * _std(g.average.std) for g in groups]
                ax.errorbar(xs, ys, yerr=errors, fmt=style, label=protocol_label(protocol), capsize=2)
        current = results.average(ModelKind.MERGED, method, "current")
        if current:
            ax.axhline(100 * current.mean, color="gray", linestyle="--", label="Current")
        ax.set_title(method, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
    for ax in axes.flat:
        ax.set_xticks(sorted(all_shots), [str(k) for k in sorted(all_shots)])
    return finish_grid(fig, axes, len(methods))


def _std(std: float) -> float:
    return 0.0 if math.isnan(std) else std


def figure_surgery(rows: RunResults | Iterable[RowLike]) -> bytes | None:
    """Figure 7: FT-Classifier and Representation Surgery against the number of unlabelled samples (k per class),
    averaged over the merged models (thin lines: each model), with Surgery on every test input for reference."""
    methods, shots, values = surgery_series(rows)
    if not methods:
        return None
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for protocol, (color, label) in {"ft_classifier": ("C0", "FT-Classifier"), "surgery": ("C3", "Surgery †")}.items():
        for method in methods:
            ax.plot(
                shots,
                [100 * values.get((method, protocol, k), math.nan) for k in shots],
                color=color,
                alpha=0.2,
                linewidth=0.8,
            )
        means = [
            _mean_percent([values[(m, protocol, k)] for m in methods if (m, protocol, k) in values]) for k in shots
        ]
        ax.plot(shots, means, color=color, marker="o", linewidth=2, label=f"{label} (mean over models)")
    full = [values[(m, "surgery", 0)] for m in methods if (m, "surgery", 0) in values]
    if full:
        ax.axhline(100 * mean(full), color="C3", linestyle=":", label="Surgery † on every test input")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("unlabelled samples per class (k)")
    ax.set_ylabel("average accuracy (%)")
    ax.legend(fontsize=7)
    return png(fig)


def _mean_percent(values: list[float]) -> float:
    return 100 * mean(values) if values else math.nan


def figure_tsne(run_dir: Path) -> bytes | None:
    """Figure 1: t-SNE of fine-tuned vs merged test features, coloured by label (saved by the runner)."""
    path = run_dir / "tsne.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    panels = data["panels"]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for kind, marker in (("finetuned", "o"), ("merged", "^")):
            xy = panel[kind]
            name = "fine-tuned" if kind == "finetuned" else f"{data['method']} merged"
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=panel["labels"], cmap="tab20", marker=marker,
                       s=9, alpha=0.5, label=f"{name} ({'●' if marker == 'o' else '▲'})")  # fmt: skip
        ax.set_title(panel["task"], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="best", markerscale=1.5)
    return png(fig)


def figure_expert_losses(experts: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """The experts' train loss per step, one line per task (a running mean over ~2 % of the steps)."""
    curves = {task: [float(v) for v in info.get("losses") or []] for task, info in experts.items()}
    curves = {task: values for task, values in curves.items() if values}
    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(6.5, 3.6))
    for task, values in curves.items():
        window = max(1, len(values) // 50)
        smooth = [mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        ax.plot(range(1, len(values) + 1), smooth, label=task, linewidth=1.2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("train loss (running mean)")
    ax.legend(fontsize=7)
    return png(fig)
