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
from mergelab.evaluate.protocols.ft_classifier import CONVERGED_TOLERANCE
from mergelab.io.writer import atomic_write_text

PROTOCOL_NAMES = {
    "current": "Current", "knn": "KNN", "ft_classifier": "FT-Classifier (reference schedule)",
    "ft_classifier:converged": "FT-Classifier (converged, L-BFGS)", "linear_probe": "Linear probe",
    "ensemble": "Ensemble", "surgery": "Surgery",
}  # fmt: skip
FT_CLASSIFIERS = ("ft_classifier", "ft_classifier:converged")  # stored names: reference schedule, solved refit


ALIGNED_KINDS = {  # stored-name prefix of an aligned cell → (fit, control)
    "aligned": ("cross-fitted", False), "aligned-control": ("cross-fitted", True),
    "aligned-insample": ("in-sample", False), "aligned-insample-control": ("in-sample", True),
}  # fmt: skip
ALIGNED_FAMILIES = ("affine", "linear", "invertible", "euclidean", "orthogonal", "scaling", "procrustes")


def aligned_kind(protocol: str) -> tuple[str, str, bool] | None:
    """(transform, fit label, is the shuffled-pairs control) of an aligned stored name, else None."""
    prefix, _, transform = protocol.partition(":")
    if not transform or prefix not in ALIGNED_KINDS:
        return None
    return (transform, *ALIGNED_KINDS[prefix])


def protocol_label(protocol: str) -> str:
    kind = aligned_kind(protocol)
    if kind:
        transform, fit, control = kind
        return f"Aligned {transform}: shuffled-pairs control ({fit})" if control else f"Aligned {transform} ({fit})"
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
    shots = sorted({r["shots"] for r in rows if r["protocol"] in ("knn", *FT_CLASSIFIERS)})
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
            *[(f"{method} + {protocol_label(p)} ({shots}-shot)", ("merged", method, p, shots)) for p in FT_CLASSIFIERS],
        ]
    candidates += [
        ("Pretrained (Current)", ("pretrained", "pretrained", "current", 0)),
        (f"Pretrained + KNN ({shots}-shot)", ("pretrained", "pretrained", "knn", shots)),
        *[(f"Pretrained + {protocol_label(p)} ({shots}-shot)", ("pretrained", "pretrained", p, shots)) for p in FT_CLASSIFIERS],
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


def aligned_series(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str, str, bool], float],
                                                       dict[str, float]]:  # fmt: skip
    """(methods, families, {(method, family, fit, control): task-average accuracy}, {method: mean majority-class
    rate over its tasks}) of the merged models' aligned cells."""
    agg = aggregate([r for r in rows if r["model"] == "merged"])
    values: dict[tuple[str, str, str, bool], float] = {}
    for (_, method, protocol, _), cells in agg.items():
        kind = aligned_kind(protocol)
        if kind and "Avg" in cells:
            values[(method, *kind)] = cells["Avg"].mean
    methods = [m for m in method_order(rows) if any(k[0] == m for k in values)]
    present = {k[1] for k in values}
    families = [f for f in ALIGNED_FAMILIES if f in present] + sorted(present - set(ALIGNED_FAMILIES))
    chance: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        extras = row.get("extras")
        if row["model"] == "merged" and aligned_kind(row["protocol"]) and isinstance(extras, dict):
            if "chance_majority" in extras:
                chance[row["method"]][row["task"]] = float(extras["chance_majority"])
    return methods, families, values, {m: mean(c.values()) for m, c in chance.items() if c}


def figure_aligned(rows: list[dict[str, Any]]) -> bytes | None:
    """Figure 4: per merged method, each aligned family's cross-fitted accuracy with its shuffled-pairs noise
    control beside it (grey, hatched), in-sample fits (if run) labelled as such, and the fine-tuned bound, the
    method's Current accuracy and chance (majority-class rate) as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, families, values, chance = aligned_series(rows)
    if not methods:
        return None
    agg = aggregate(rows)
    finetuned = agg.get(("finetuned", "individual", "current", 0), {}).get("Avg")
    styles = [  # (fit, control, legend label, bar style)
        ("cross-fitted", False, "cross-fitted", {"color": "C0"}),
        ("cross-fitted", True, "shuffled-pairs control (cross-fitted)",
         {"color": "0.75", "hatch": "//", "edgecolor": "0.4"}),
        ("in-sample", False, "in-sample (fit = scored items)", {"color": "C1", "alpha": 0.6}),
        ("in-sample", True, "shuffled-pairs control (in-sample)", {"color": "0.9", "hatch": "..", "edgecolor": "0.5"}),
    ]  # fmt: skip
    styles = [s for s in styles if any((m, f, s[0], s[1]) in values for m in methods for f in families)]
    panel = max(3.0, 0.3 * len(families) * len(styles) + 1.2)
    cols = max(1, min(3, len(methods), int(18 // panel)))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(panel * cols + 2.5, 3.6 * rows_n), squeeze=False, sharey=True)
    width = 0.8 / len(styles)
    for ax, method in zip(axes.flat, methods, strict=False):
        for j, (fit, control, label, style) in enumerate(styles):
            ys = [100 * values.get((method, f, fit, control), math.nan) for f in families]
            ax.bar([i + j * width for i in range(len(families))], ys, width, label=label, **style)
        if finetuned:
            ax.axhline(100 * finetuned.mean, color="black", linestyle="--", linewidth=1, label="fine-tuned bound")
        current = agg.get(("merged", method, "current", 0), {}).get("Avg")
        if current:
            ax.axhline(100 * current.mean, color="C3", linestyle="-.", linewidth=1, label="Current (no map)")
        if method in chance:
            ax.axhline(100 * chance[method], color="0.3", linestyle=":", linewidth=1, label="chance (majority class)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(families))], families, rotation=45, fontsize=8)
        ax.set_title(method, fontsize=9)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("average accuracy (%)")
    fig.suptitle("Aligned transforms, fitted on unlabelled test inputs (transductive): held-out (cross-fitted) "
                 "accuracy vs its shuffled-pairs noise control", fontsize=9)  # fmt: skip
    axes[0][cols - 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _png(fig)


CONTROL_TOLERANCE = 0.05  # a cross-fitted noise control more than this from chance (Σ p_c q_c) is flagged


def aligned_table(rows: list[dict[str, Any]]) -> str:
    """Figure 4's numbers: per merged method and family, the task-average accuracy cross-fitted, of its noise
    control, the majority-class rate and in-sample (when run); the check column flags a cross-fitted control
    more than 5 points, on any task, from the accuracy that predictions independent of the labels with the
    control's own predicted-class frequencies would have (Σ_c p_c q_c)."""
    methods, families, values, chance = aligned_series(rows)
    if not methods:
        return ""
    gaps: dict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        kind = aligned_kind(row["protocol"])
        extras = row.get("extras")
        if row["model"] == "merged" and kind and kind[1:] == ("cross-fitted", True) and isinstance(extras, dict):
            if "chance_independent" in extras or "chance_majority" in extras:
                chance_of_row = extras.get("chance_independent", extras.get("chance_majority"))
                gap = abs(float(row["accuracy"]) - float(chance_of_row))
                gaps[(row["method"], kind[0])] = max(gaps[(row["method"], kind[0])], gap)
    in_sample = any(k[2] == "in-sample" for k in values)

    def pct(key: tuple[str, str, str, bool]) -> str:
        return f"{100 * values[key]:.1f}" if key in values else "–"

    lines = []
    for method in methods:
        for family in families:
            if not any(k[:2] == (method, family) for k in values):
                continue
            check = "–"
            if (method, family) in gaps:
                gap = gaps[(method, family)]
                check = "✓" if gap <= CONTROL_TOLERANCE else f"⚠ {100 * gap:.1f} pt from chance"
            line = [method, family, pct((method, family, "cross-fitted", False)),
                    pct((method, family, "cross-fitted", True)),
                    f"{100 * chance[method]:.1f}" if method in chance else "–", check]  # fmt: skip
            if in_sample:
                line += [pct((method, family, "in-sample", False)), pct((method, family, "in-sample", True))]
            lines.append(line)
    header = ["method", "family", "cross-fitted †", "shuffled-pairs control †", "majority rate",
              "control within 5 pt of chance Σ p_c q_c (every task)"]  # fmt: skip
    if in_sample:
        header += ["in-sample †", "in-sample control †"]
    return markdown_table(header, lines)


def figure_shots(rows: list[dict[str, Any]]) -> bytes | None:
    """Figure 5: average accuracy against shots for Current (flat), KNN and FT-Classifier (reference schedule and
    converged), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    methods = [m for m in method_order(rows) if any(k[1] == m and k[2] in ("knn", *FT_CLASSIFIERS) for k in agg)]
    if not methods:
        return None
    cols = min(4, len(methods))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        current = agg.get(("merged", method, "current", 0), {}).get("Avg")
        for protocol, style in (("knn", "o-"), ("ft_classifier", "s-"), ("ft_classifier:converged", "^--")):
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


# ----------------------------------------------------- FT-Classifier solvers, does the protocol change the verdict


def ft_kl_table(rows: list[dict[str, Any]]) -> str:
    """Per model kind, shot count and FT-Classifier solver: the mean full-batch KL on the few-shot inputs before
    and after the head refit (the objective both solvers minimise), mean iterations, and how many refits met the
    gradient tolerance (converged solver only). Rows without the KL in their extras (older runs) are skipped."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        extras = row.get("extras")
        if row["protocol"] in FT_CLASSIFIERS and isinstance(extras, dict) and "final_kl" in extras:
            groups[(row["model"], row["shots"], row["protocol"])].append(extras)
    lines = []
    for (model, shots, protocol), extras in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                  FT_CLASSIFIERS.index(kv[0][2]))):  # fmt: skip
        initial = [float(e["initial_kl"]) for e in extras if "initial_kl" in e]
        iterations = [float(e["iterations"]) for e in extras if "iterations" in e]
        met = [bool(e["converged"]) for e in extras if "converged" in e]
        lines.append([model, str(shots), protocol_label(protocol), str(len(extras)),
                      f"{mean(initial):.4g}" if initial else "–", f"{mean(float(e['final_kl']) for e in extras):.4g}",
                      f"{max(float(e['final_kl']) for e in extras):.4g}", f"{mean(iterations):.0f}" if iterations else "–",
                      f"{sum(met)}/{len(met)}" if met else "–"])  # fmt: skip
    header = ["model", "shots", "solver", "refits", "mean initial KL", "mean final KL", "max final KL",
              "mean iterations", "gradient tolerance met"]  # fmt: skip
    return markdown_table(header, lines) if lines else ""


VERDICT_PROTOCOLS = ("current", "knn", *FT_CLASSIFIERS, "linear_probe")


def verdict_scores(rows: list[dict[str, Any]], shots: int,
                   methods: list[str] | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """protocol → merged method → task-average test accuracy (mean over seeds): few-shot protocols at ``shots``,
    the others (Current, the aligned families — fitted, not their shuffled-pairs controls) at their single cell.
    Protocols no method has are left out."""
    agg = aggregate([r for r in rows if r["model"] == "merged"])
    aligned = sorted({k[2] for k in agg if k[2].split(":", 1)[0] in ("aligned", "aligned-insample") and ":" in k[2]})
    out: dict[str, dict[str, float]] = {}
    for protocol in (*VERDICT_PROTOCOLS, *aligned):
        scores = {}
        for method in method_order(rows, methods):
            cell = next((agg[key]["Avg"] for key in (("merged", method, protocol, shots), ("merged", method, protocol, 0))
                         if key in agg and "Avg" in agg[key]), None)  # fmt: skip
            if cell is not None:
                scores[method] = cell.mean
        if scores:
            out[protocol] = scores
    return out


def rank_methods(scores: dict[str, float]) -> dict[str, float]:
    """Rank of each method, 1 = highest score; tied scores share the mean of the ranks they span."""
    ordered = sorted(scores.values(), reverse=True)
    return {m: mean(i + 1 for i, v in enumerate(ordered) if v == s) for m, s in scores.items()}


def kendall_matrix(scores: dict[str, dict[str, float]]) -> dict[tuple[str, str], float]:
    """Kendall τ (τ-b, ties allowed) between every ordered pair of protocols, over the methods both scored; NaN
    when fewer than two methods are shared or one side ranks them all equal."""
    import warnings

    from scipy.stats import kendalltau

    out: dict[tuple[str, str], float] = {}
    for a, sa in scores.items():
        for b, sb in scores.items():
            common = [m for m in sa if m in sb]
            tau = math.nan
            if len(common) >= 2 and len({sa[m] for m in common}) > 1 and len({sb[m] for m in common}) > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tau = float(kendalltau([sa[m] for m in common], [sb[m] for m in common]).statistic)
            out[(a, b)] = tau
    return out


def biggest_movers(scores: dict[str, dict[str, float]], base: str = "current") -> dict[str, list[tuple[str, float, float]]]:
    """For every protocol but ``base``: the methods whose rank moves most from ``base`` to it, as (method, rank
    under base, rank under it), ranks among the methods both scored; every method tied for the largest move,
    none when no rank moves."""
    if base not in scores:
        return {}
    out: dict[str, list[tuple[str, float, float]]] = {}
    for protocol, other in scores.items():
        if protocol == base:
            continue
        common = [m for m in scores[base] if m in other]
        before = rank_methods({m: scores[base][m] for m in common})
        after = rank_methods({m: other[m] for m in common})
        largest = max((abs(after[m] - before[m]) for m in common), default=0.0)
        out[protocol] = [(m, before[m], after[m]) for m in common if largest > 0 and abs(after[m] - before[m]) == largest]
    return out


def _rank_text(rank: float) -> str:
    return f"{rank:g}"


def verdict_section(rows: list[dict[str, Any]], shots: int, methods: list[str] | None = None) -> str:
    """The ranking of the merged methods under each protocol, Kendall τ between protocols, the biggest movers."""
    scores = verdict_scores(rows, shots, methods)
    if len(scores) < 2 or max(len(s) for s in scores.values()) < 2:
        return ""
    protocols = list(scores)

    merged = [r for r in rows if r["model"] == "merged"]  # † where the protocol itself is (every row of it)
    transductive = {p for p in protocols if all(r["transductive"] for r in merged if r["protocol"] == p)}

    def label(protocol: str) -> str:
        return protocol_label(protocol) + (" †" if protocol in transductive else "")

    ranks = {p: rank_methods(s) for p, s in scores.items()}
    names = method_order(rows, methods)
    rank_lines = [[m, *[f"{_rank_text(ranks[p][m])} ({100 * scores[p][m]:.1f})" if m in scores[p] else "–"
                        for p in protocols]] for m in names if any(m in s for s in scores.values())]  # fmt: skip
    taus = kendall_matrix(scores)
    tau_lines = [[label(a), *[("–" if math.isnan(taus[(a, b)]) else f"{taus[(a, b)]:+.2f}") for b in protocols]]
                 for a in protocols]  # fmt: skip
    parts = [
        f"Merged methods (each at its chosen grid value) ranked by task-average test accuracy, mean over seeds; "
        f"few-shot protocols at {shots} shots per class. Rank 1 = best; the accuracy (%) is in brackets; † "
        "transductive. τ = Kendall's τ-b over the methods both protocols scored (+1: same order, −1: reversed).",
        markdown_table(["method", *[label(p) for p in protocols]], rank_lines),
        "Kendall τ between the protocols' rankings:",
        markdown_table(["τ", *[label(p) for p in protocols]], tau_lines),
    ]
    movers = biggest_movers(scores)
    if movers:
        mover_lines = []
        for protocol, moved in movers.items():
            tau = taus.get(("current", protocol), math.nan)
            text = "; ".join(f"{m} {_rank_text(r0)} → {_rank_text(r1)}" for m, r0, r1 in moved) or "no rank moves"
            mover_lines.append([label(protocol), "–" if math.isnan(tau) else f"{tau:+.2f}", text])
        parts += ["Methods whose rank moves most from Current (rank under Current → rank under the protocol):",
                  markdown_table(["protocol", "τ with Current", "biggest movers"], mover_lines)]  # fmt: skip
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------- experts: are the bounds bounds?


def expert_verdict(info: dict[str, Any]) -> str:
    """'✓', or the flags an expert raises: below its frozen-encoder probe, below the majority-class rate."""
    flags = []
    for key, flag, other in (("below_probe", "below probe", "probe_accuracy"),
                             ("below_majority", "below majority", "majority_rate")):  # fmt: skip
        below = info.get(key)
        if below is None and info.get("test_accuracy") is not None and info.get(other) is not None:
            below = float(info["test_accuracy"]) < float(info[other])
        if below:
            flags.append(flag)
    return "⚠ " + ", ".join(flags) if flags else "✓"


def experts_table(experts: dict[str, dict[str, Any]]) -> str:
    """task | expert test acc | frozen-encoder probe | majority rate | head moved | steps | verdict."""

    def pct(value: Any) -> str:
        return f"{100 * float(value):.1f}" if value is not None else "–"

    lines = []
    for task, info in experts.items():
        shift = info.get("head_shift")
        lines.append([task, pct(info.get("test_accuracy")), pct(info.get("probe_accuracy")),
                      pct(info.get("majority_rate")), f"{float(shift):.3f}" if shift is not None else "–",
                      str(info.get("steps", "–")), expert_verdict(info)])  # fmt: skip
    header = ["task", "expert test acc (%)", "frozen-encoder probe (%)", "majority rate (%)",
              "head moved ‖W−W₀‖/‖W₀‖", "steps", "verdict"]  # fmt: skip
    return markdown_table(header, lines) if lines else ""


def figure_expert_losses(experts: dict[str, dict[str, Any]]) -> bytes | None:
    """The experts' train loss per step, one line per task (a running mean over ~2 % of the steps)."""
    curves = {task: [float(v) for v in info.get("losses") or []] for task, info in experts.items()}
    curves = {task: values for task, values in curves.items() if values}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for task, values in curves.items():
        window = max(1, len(values) // 50)
        smooth = [mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        ax.plot(range(1, len(values) + 1), smooth, label=task, linewidth=1.2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("train loss (running mean)")
    ax.set_title("Experts' fine-tuning: train loss per step")
    ax.legend(fontsize=7)
    return _png(fig)



# ----------------------------------------------------------------------------------------------------- report


def build_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html (plots embedded) and the PNG figures into ``run_dir``."""
    run_dir = Path(run_dir)
    with ResultStore(run_dir / "results.sqlite") as store:
        rows = store.rows("test")
        meta = {key: store.get_meta(key)
                for key in ("config", "chosen", "selection", "provenance", "versions", "timings", "learned",
                            "fewshot_pool")}  # fmt: skip
        meta["experts"] = store.get_meta("experts", {})
    if not rows:
        from mergelab.core.errors import MergelabError

        raise MergelabError(f"no results in {run_dir}; run `mergelab bench CONFIG --out {run_dir}` first")
    tasks = task_order(rows)
    shots = table_shots(rows)
    table = main_table(rows, tasks, shots, config_methods(meta.get("config")))
    header = ["", *tasks, "Avg"]
    md_lines = [[label + (" †" if transductive else ""), *cells] for label, cells, transductive in table]
    figures = {"fig4_aligned.png": figure_aligned(rows), "fig5_shots.png": figure_shots(rows),
               "fig1_tsne.png": figure_tsne(run_dir), "fig7_surgery.png": figure_surgery(rows)}  # fmt: skip
    figures["fig_expert_losses.png"] = figure_expert_losses(meta.get("experts") or {})
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
    experts = experts_table(meta.get("experts") or {})
    if experts:
        sections += ["## Experts: are the upper bounds bounds?",
                     "Each expert against the frozen-encoder linear probe and the majority-class rate (an expert "
                     "that does not beat its probe is under-trained, so no upper bound); head moved = relative "
                     "change of the head weight during fine-tuning. Train-loss curves: fig_expert_losses.png.",
                     experts]  # fmt: skip
    kl = ft_kl_table(rows)
    if kl:
        sections += ["## FT-Classifier: reference schedule vs the solved head refit",
                     "The reference schedule is the paper's code (Adam 5e-4, 5 epochs, batch 1: 5·k·C steps); the "
                     "converged solver minimises the same KL(p_fine-tuned ‖ p_student) on the same few-shot inputs "
                     "from the same initialisation by full-batch L-BFGS until max |gradient| ≤ its tolerance "
                     f"(default {CONVERGED_TOLERANCE:g}). KL = full-batch KL on those inputs (convex in a linear "
                     "head, so the converged value is its minimum up to that tolerance).",
                     kl]  # fmt: skip
    verdict = verdict_section(rows, shots, config_methods(meta.get("config")))
    if verdict:
        sections += ["## Does the protocol change the verdict?", verdict]
    if other:
        sections += ["## Every protocol (average over tasks)", other]
    aligned = aligned_table(rows)
    if aligned:
        sections += ["## Figure 4: aligned transforms (average accuracy %, † transductive)",
                     "Each family is fitted on half of the unlabelled test inputs and scored on the other half, both "
                     "ways (every item scored once, by the map that did not see it); the control runs the same "
                     "procedure with the merged rows shuffled against the fine-tuned rows and labels (each item "
                     "paired with another item's merged features), so it should score chance: Σ_c p_c q_c, the "
                     "accuracy of predictions independent of the labels with the control's own predicted-class "
                     "frequencies q (at most the majority rate). "
                     "In-sample columns (if run) fit and score the same items: they measure capacity, not "
                     "alignment.", aligned]  # fmt: skip
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
    for task, pool in (meta.get("fewshot_pool") or {}).items():
        lines.append(f"- few-shot pool `{task}`: {pool['size']} train examples ({pool['per_class']} per class asked, "
                     f"smallest class {pool['smallest_class']}); each seed draws its k per class from it")
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
