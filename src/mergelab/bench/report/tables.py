"""The report's result tables: Table 2 (+ Table 3's pretrained rows), every protocol, the experts, the
FT-Classifier solvers' KL, Figure 4's aligned numbers, Figure 7's Surgery numbers and NeuLig."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import mean
from typing import Any

from mergelab.bench.report.labels import (
    ALIGNED_FAMILIES,
    FT_CLASSIFIERS,
    aligned_kind,
    dagger,
    protocol_label,
)
from mergelab.bench.report.model import MISSING, Row, Table, mark_best, percent_cell, row, stat_cell, text_cell
from mergelab.bench.report.run import RowLike, RunResults, as_results
from mergelab.evaluation.results import GroupSummary, ModelKind

CONTROL_TOLERANCE = 0.05  # a cross-fitted noise control more than this from chance (Σ p_c q_c) is flagged


@dataclass(frozen=True)
class Line:
    """One line of Table 2: its label and the summary group it shows."""

    label: str
    model: ModelKind
    method: str
    protocol: str
    shots: int = 0


def main_lines(methods: Iterable[str], shots: int) -> list[Line]:
    """Every candidate line of Table 2 (+ Table 3's pretrained rows and the ensemble), in display order."""
    merged, pretrained = ModelKind.MERGED, ModelKind.PRETRAINED
    lines = [
        Line("Fine-tuned (individual)", ModelKind.FINETUNED, "individual", "current"),
        Line("Multi-task learning", ModelKind.MULTITASK, "mtl", "current"),
    ]
    for method in methods:
        lines += [
            Line(method, merged, method, "current"),
            Line(f"{method} + KNN ({shots}-shot)", merged, method, "knn", shots),
        ]
        lines += [
            Line(f"{method} + {protocol_label(p)} ({shots}-shot)", merged, method, p, shots) for p in FT_CLASSIFIERS
        ]
    lines += [
        Line("Pretrained (Current)", pretrained, "pretrained", "current"),
        Line(f"Pretrained + KNN ({shots}-shot)", pretrained, "pretrained", "knn", shots),
        *[
            Line(f"Pretrained + {protocol_label(p)} ({shots}-shot)", pretrained, "pretrained", p, shots)
            for p in FT_CLASSIFIERS
        ],
        Line("Ensemble of the fine-tuned encoders (features)", ModelKind.ENSEMBLE, "ensemble", "ensemble"),
    ]
    return lines


def main_groups(results: RunResults, shots: int) -> list[tuple[Line, GroupSummary]]:
    """Table 2's lines that were run, with their summary groups."""
    found = [
        (line, results.group(line.model, line.method, line.protocol, line.shots))
        for line in main_lines(results.methods, shots)
    ]
    return [(line, group) for line, group in found if group is not None]


def main_results_table(results: RunResults) -> Table:
    """Table 2 (+ Table 3's pretrained rows and the ensemble) at the run's table shots; the best merged value of
    each column is marked (transductive rows do not compete)."""
    columns = [*results.tasks, "average"]
    rows = [
        row(
            [text_cell(dagger(line.label, group.transductive)), *[stat_cell(group.get(c)) for c in columns]],
            transductive=group.transductive,
            contender=line.model is ModelKind.MERGED and not group.transductive,
        )
        for line, group in main_groups(results, results.shots)
    ]
    header = ("", *results.tasks, "Avg")
    return Table(header, mark_best(rows, range(1, len(header))))


def main_table(
    rows: Iterable[RowLike], tasks: list[str], shots: int, methods: list[str] | None = None
) -> list[tuple[str, list[str], bool]]:
    """Table 2's lines as (label, cell texts for ``tasks`` and Avg, transductive) — for the CLI's console table."""
    results = RunResults.of(rows, methods)
    return [
        (line.label, [stat_cell(group.get(c)).text for c in [*tasks, "average"]], group.transductive)
        for line, group in main_groups(results, shots)
    ]


def every_protocol_table(results: RunResults) -> Table:
    """Every (model, method, protocol, shots) group with its task cells and average (folded in the HTML)."""
    groups = sorted(results.summary.values(), key=lambda g: (g.key.model, g.key.method, g.key.protocol, g.key.shots))
    rows = [
        row(
            [
                g.key.model,
                g.key.method,
                dagger(protocol_label(g.key.protocol), g.transductive),
                str(g.key.shots),
                *[stat_cell(g.get(t)) for t in [*results.tasks, "average"]],
            ],
            transductive=g.transductive,
        )  # fmt: skip
        for g in groups
    ]
    header = ("model", "method", "protocol", "shots", *results.tasks, "Avg")
    return Table(header, tuple(rows), label_columns=4, collapsed=True)


# ------------------------------------------------------------------------------- experts: are the bounds bounds?


def expert_verdict(info: Mapping[str, Any]) -> str:
    """'✓', or the flags an expert raises: below its frozen-encoder probe, below the majority-class rate."""
    flags = []
    for key, flag, other in (
        ("below_probe", "below probe", "probe_accuracy"),
        ("below_majority", "below majority", "majority_rate"),
    ):
        below = info.get(key)
        if below is None and info.get("test_accuracy") is not None and info.get(other) is not None:
            below = float(info["test_accuracy"]) < float(info[other])
        if below:
            flags.append(flag)
    return "⚠ " + ", ".join(flags) if flags else "✓"


def experts_table(experts: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """task | expert test acc | frozen-encoder probe | majority rate | head moved | steps | verdict."""
    if not experts:
        return None
    rows = []
    for task, info in experts.items():
        shift = info.get("head_shift")
        rows.append(row([
            task, percent_cell(_number(info.get("test_accuracy"))), percent_cell(_number(info.get("probe_accuracy"))),
            percent_cell(_number(info.get("majority_rate"))), f"{float(shift):.3f}" if shift is not None else MISSING,
            str(info.get("steps", MISSING)), expert_verdict(info),
        ]))  # fmt: skip
    header = ("task", "expert test acc (%)", "frozen-encoder probe (%)", "majority rate (%)",
              "head moved ‖W−W₀‖/‖W₀‖", "steps", "verdict")  # fmt: skip
    return Table(header, tuple(rows))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


# ------------------------------------------------------------------------------------- FT-Classifier solvers' KL


def ft_kl_table(rows: RunResults | Iterable[RowLike]) -> Table | None:
    """Per model kind, shot count and FT-Classifier solver: the mean full-batch KL on the few-shot inputs before
    and after the head refit (the objective both solvers minimise), mean iterations, and how many refits met the
    gradient tolerance (converged solver only). Rows without the KL in their extras (older runs) are skipped."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in as_results(rows).rows:
        if r.protocol in FT_CLASSIFIERS and "final_kl" in r.extras:
            groups[(r.model, r.shots, r.protocol)].append(r.extras)
    lines = []
    for (model, shots, protocol), extras in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], FT_CLASSIFIERS.index(kv[0][2]))
    ):
        initial = [float(e["initial_kl"]) for e in extras if "initial_kl" in e]
        final = [float(e["final_kl"]) for e in extras]
        iterations = [float(e["iterations"]) for e in extras if "iterations" in e]
        met = [bool(e["converged"]) for e in extras if "converged" in e]
        lines.append(row([
            model, str(shots), protocol_label(protocol), str(len(extras)),
            f"{mean(initial):.4g}" if initial else MISSING,
            f"{mean(final):.4g}", f"{max(final):.4g}", f"{mean(iterations):.0f}" if iterations else MISSING,
            f"{sum(met)}/{len(met)}" if met else MISSING,
        ]))  # fmt: skip
    header = ("model", "shots", "solver", "refits", "mean initial KL", "mean final KL", "max final KL",
              "mean iterations", "gradient tolerance met")  # fmt: skip
    return Table(header, tuple(lines), label_columns=3) if lines else None


# ------------------------------------------------------------------------------------------ Figure 4's numbers


AlignedValues = dict[tuple[str, str, str, bool], float]


def aligned_series(
    rows: RunResults | Iterable[RowLike],
) -> tuple[list[str], list[str], AlignedValues, dict[str, float]]:
    """(methods, families, {(method, family, fit, control): task-average accuracy}, {method: mean majority-class
    rate over its tasks}) of the merged models' aligned cells."""
    results = as_results(rows)
    values: AlignedValues = {}
    for group in results.summary.select(model=ModelKind.MERGED):
        kind = aligned_kind(group.key.protocol)
        if kind:
            values[(group.key.method, *kind)] = group.average.mean
    methods = [m for m in results.methods if any(k[0] == m for k in values)]
    present = {k[1] for k in values}
    families = [f for f in ALIGNED_FAMILIES if f in present] + sorted(present - set(ALIGNED_FAMILIES))
    chance: dict[str, dict[str, float]] = defaultdict(dict)
    for r in results.rows_of(ModelKind.MERGED):
        if aligned_kind(r.protocol) and "chance_majority" in r.extras:
            chance[r.method][r.task] = float(r.extras["chance_majority"])
    return methods, families, values, {m: mean(c.values()) for m, c in chance.items() if c}


def control_gaps(results: RunResults) -> dict[tuple[str, str], float]:
    """(method, family) → the largest distance, over tasks, of the cross-fitted shuffled-pairs control from the
    accuracy of label-independent predictions with the control's own class frequencies (Σ_c p_c q_c)."""
    gaps: dict[tuple[str, str], float] = defaultdict(float)
    for r in results.rows_of(ModelKind.MERGED):
        kind = aligned_kind(r.protocol)
        if (
            kind
            and kind[1:] == ("cross-fitted", True)
            and ("chance_independent" in r.extras or "chance_majority" in r.extras)
        ):
            chance = float(r.extras.get("chance_independent", r.extras.get("chance_majority")))
            gaps[(r.method, kind[0])] = max(gaps[(r.method, kind[0])], abs(r.accuracy - chance))
    return dict(gaps)


def control_check(gap: float | None) -> str:
    """'✓' for a control within 5 points of chance, else how far it is ('–' when unknown)."""
    if gap is None:
        return MISSING
    return "✓" if gap <= CONTROL_TOLERANCE else f"⚠ {100 * gap:.1f} pt from chance"


def aligned_table(rows: RunResults | Iterable[RowLike]) -> Table | None:
    """Figure 4's numbers: per merged method and family, the task-average accuracy cross-fitted, of its noise
    control, the majority-class rate and in-sample (when run); the check column flags a cross-fitted control
    more than 5 points, on any task, from the accuracy that predictions independent of the labels with the
    control's own predicted-class frequencies would have (Σ_c p_c q_c)."""
    results = as_results(rows)
    methods, families, values, chance = aligned_series(results)
    if not methods:
        return None
    gaps = control_gaps(results)
    in_sample = any(k[2] == "in-sample" for k in values)
    lines = []
    for method in methods:
        for family in families:
            if not any(k[:2] == (method, family) for k in values):
                continue
            cells = [method, family, percent_cell(values.get((method, family, "cross-fitted", False))),
                     percent_cell(values.get((method, family, "cross-fitted", True))), percent_cell(chance.get(method)),
                     control_check(gaps.get((method, family)))]  # fmt: skip
            if in_sample:
                cells += [percent_cell(values.get((method, family, "in-sample", flag))) for flag in (False, True)]
            lines.append(row(cells))  # every row is transductive: the header says so
    header = ["method", "family", "cross-fitted †", "shuffled-pairs control †", "majority rate",
              "control within 5 pt of chance Σ p_c q_c (every task)"]  # fmt: skip
    if in_sample:
        header += ["in-sample †", "in-sample control †"]
    return Table(tuple(header), tuple(lines), label_columns=2)


# ------------------------------------------------------------------------------------------ Figure 7's numbers


SurgeryValues = dict[tuple[str, str, int], float]


def surgery_series(rows: RunResults | Iterable[RowLike]) -> tuple[list[str], list[int], SurgeryValues]:
    """(methods, shot counts, {(method, protocol, k): average accuracy}) for FT-Classifier vs Surgery; k = 0 is
    Surgery on every eval input."""
    results = as_results(rows)
    methods = [m for m in results.methods if results.group(ModelKind.MERGED, m, "surgery", 0)]
    shots = sorted(
        {g.key.shots for g in results.summary.select(model=ModelKind.MERGED, protocol="surgery") if g.key.shots > 0}
    )
    values: SurgeryValues = {}
    for method in methods:
        for protocol in ("ft_classifier", "surgery"):
            for k in [0, *shots]:
                average = results.average(ModelKind.MERGED, method, protocol, k)
                if average is not None:
                    values[(method, protocol, k)] = average.mean
    return methods, shots, values


def surgery_table(rows: RunResults | Iterable[RowLike]) -> Table | None:
    """Figure 7's numbers: per merged model, FT-Classifier / Surgery at each k, and Surgery on every test input."""
    results = as_results(rows)
    methods, shots, values = surgery_series(results)
    if not methods:
        return None
    lines = []
    for method in methods:
        cells = []
        for k in shots:
            ft, sg = values.get((method, "ft_classifier", k)), values.get((method, "surgery", k))
            cells.append(f"{100 * ft:.1f} / {100 * sg:.1f}" if ft is not None and sg is not None else MISSING)
        transductive = results.transductive_method(method)
        name = dagger(method, transductive)
        lines.append(
            row([name, *cells, percent_cell(values.get((method, "surgery", 0)))], transductive, not transductive)
        )
    header = ("model", *[f"k={k}: FT-Cl / Surgery †" for k in shots], "Surgery † (all test inputs)")
    return Table(header, mark_best(lines, [len(header) - 1]))


# ------------------------------------------------------------------------------------------------------ NeuLig


NEULIG_NOTE = (
    "Gap = ensemble − merge (points, average over tasks); the seed paper reports 95.46 vs 95.44 (0.02). "
    "Top weight = mean over test batches of the largest merge weight (1.0: the merge is one expert)."
)


def neulig_table(results: RunResults) -> Table | None:
    """Ensembling and merging accuracy of the NeuLig router per task, the gap and the mean largest merge weight."""
    groups = results.summary.select(model=ModelKind.NEULIG)
    if not groups:
        return None
    ensemble = results.average(ModelKind.NEULIG, "ensemble", "current", 0)
    lines: list[Row] = []
    for g in sorted(groups, key=lambda g: (g.key.method != "ensemble", g.key.method)):
        gap = top = MISSING
        if g.key.method != "ensemble" and ensemble is not None:
            gap = f"{100 * (ensemble.mean - g.average.mean):+.2f}"
            tops = [float(r.extras["top_weight"]) for r in results.rows_of(ModelKind.NEULIG)
                    if r.summary_key == g.key and "top_weight" in r.extras]  # fmt: skip
            top = f"{mean(tops):.3f}" if tops else MISSING
        lines.append(row([g.key.method, *[stat_cell(g.get(t)) for t in [*results.tasks, "average"]], gap, top]))
    header = ("NeuLig", *results.tasks, "Avg", "gap (pt)", "top weight")
    return Table(header, mark_best(lines, range(1, len(results.tasks) + 2)), note=NEULIG_NOTE)
