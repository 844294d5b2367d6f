"""The summary at the top of the report: each verdict the run supports, with its numbers."""

from __future__ import annotations

from collections.abc import Mapping
from statistics import mean
from typing import Any

from mergelab.bench.report.labels import dagger, protocol_label
from mergelab.bench.report.model import Finding, Findings
from mergelab.bench.report.run import RunResults
from mergelab.bench.report.tables import CONTROL_TOLERANCE, control_gaps, expert_verdict, surgery_series
from mergelab.bench.report.verdict import VERDICT_PROTOCOLS, kendall_matrix, tau_text, verdict_scores
from mergelab.evaluation.results import ModelKind


def signed(points: float) -> str:
    """A difference in points, signed."""
    return f"{points:+.1f}"


def bounds_finding(results: RunResults) -> Finding | None:
    """The references (experts, pretrained, ensemble, multi-task) and where the merged methods fall under Current."""
    references = [
        ("fine-tuned experts", (ModelKind.FINETUNED, "individual", "current"), " (upper bound)"),
        ("pretrained encoder", (ModelKind.PRETRAINED, "pretrained", "current"), " (lower bound)"),
        ("ensemble of the experts", (ModelKind.ENSEMBLE, "ensemble", "ensemble"), ""),
        ("multi-task learning", (ModelKind.MULTITASK, "mtl", "current"), ""),
    ]
    parts = [f"{name} {stat.text()}{note}" for name, key, note in references if (stat := results.average(*key))]
    current = shown_averages(results, "current")
    if current:
        low, high = min(current, key=current.get), max(current, key=current.get)
        text = (
            f"under Current the merged methods score {current[low]:.1f} ({name(results, low)}) to "
            f"{current[high]:.1f} ({name(results, high)})"
        )
        expert = results.average(ModelKind.FINETUNED, "individual", "current")
        if expert:
            below = (expert.percent() - current[high], expert.percent() - current[low])
            text += f", {below[0]:.1f} to {below[1]:.1f} points below the experts"
        parts.append(text)
    if not parts:
        return None
    return Finding("Bounds", "Task-average accuracy (%): " + "; ".join(parts) + ".")


def name(results: RunResults, method: str) -> str:
    """A merged method's name, with † when the method itself is transductive (its Current rows are)."""
    return dagger(method, results.transductive_method(method))


def shown_averages(results: RunResults, protocol: str, shots: int = 0) -> dict[str, float]:
    """merged method → task-average accuracy (%) under ``protocol`` at ``shots``, rounded as the tables show it
    (so every difference the summary states can be checked against the tables)."""
    found = {m: results.average(ModelKind.MERGED, m, protocol, shots) for m in results.methods}
    return {m: stat.percent() for m, stat in found.items() if stat is not None}


def gap_finding(results: RunResults, protocol: str, title: str) -> Finding | None:
    """How far ``protocol`` (at the table's shots) moves each merged method from its Current accuracy, and how
    much of the distance to the fine-tuned experts that closes."""
    current, other = shown_averages(results, "current"), shown_averages(results, protocol, results.shots)
    gaps = {m: other[m] - current[m] for m in current if m in other}
    if not gaps:
        return None
    low, high = min(gaps, key=gaps.get), max(gaps, key=gaps.get)
    above, average = sum(g > 0 for g in gaps.values()), mean(gaps.values())
    text = (
        f"{protocol_label(protocol)} at {results.shots} shots per class minus Current: {signed(average)} points on "
        f"average over {len(gaps)} merged methods ({signed(gaps[low])} for {name(results, low)} to "
        f"{signed(gaps[high])} for {name(results, high)}); higher than Current for {above} of {len(gaps)}."
    )
    expert = results.average(ModelKind.FINETUNED, "individual", "current")
    room = {m: expert.percent() - current[m] for m in gaps if expert and expert.percent() > current[m]}
    if room and average > 0:
        closed = mean(gaps[m] / room[m] for m in room)
        text += f" On average it closes {100 * closed:.0f} % of the distance from Current to the fine-tuned experts."
    return Finding(title, text)


def ranking_finding(results: RunResults) -> Finding | None:
    """Which method each (inductive) protocol ranks first, and how far each ranking agrees with Current's."""
    scores = {p: s for p, s in verdict_scores(results, results.shots).items() if p in VERDICT_PROTOCOLS}
    if len(scores) < 2 or max(len(s) for s in scores.values()) < 2:
        return None
    winners: dict[str, list[str]] = {}
    for protocol, by_method in scores.items():
        winners.setdefault(name(results, max(by_method, key=by_method.get)), []).append(protocol_label(protocol))
    text = "; ".join(f"{m} ranks first under {', '.join(labels)}" for m, labels in winners.items()) + "."
    taus = kendall_matrix(scores)
    if "current" in scores:
        agree = [f"{protocol_label(p)} {tau_text(taus[('current', p)])}" for p in scores if p != "current"]
        text += " Kendall τ with Current's ranking: " + ", ".join(agree) + "."
    return Finding("Ranking", text)


def experts_finding(experts: Mapping[str, Mapping[str, Any]]) -> Finding | None:
    """Whether every expert beats its frozen-encoder probe and the majority rate (so it is an upper bound)."""
    if not experts:
        return None
    flagged = {task: expert_verdict(info) for task, info in experts.items() if expert_verdict(info) != "✓"}
    if not flagged:
        every = "Both" if len(experts) == 2 else f"All {len(experts)}"
        return Finding("Experts", f"{every} experts beat their frozen-encoder probe and the majority-class rate.")
    detail = "; ".join(f"{task}: {verdict.removeprefix('⚠ ')}" for task, verdict in flagged.items())
    text = f"{len(flagged)} of {len(experts)} experts are flagged ({detail}): no upper bound on those tasks."
    return Finding("Experts", text)


def controls_finding(results: RunResults) -> Finding | None:
    """How many aligned shuffled-pairs controls sit at chance, and which do not."""
    gaps = control_gaps(results)
    if not gaps:
        return None
    far = {key: gap for key, gap in gaps.items() if gap > CONTROL_TOLERANCE}
    text = f"{len(gaps) - len(far)} of {len(gaps)} shuffled-pairs controls of the aligned maps † are within 5 points"
    text += " of chance"
    if far:
        text += "; flagged: " + ", ".join(f"{m} {f} ({100 * g:.1f} pt)" for (m, f), g in far.items())
    return Finding("Aligned controls", text + ".")


def surgery_finding(results: RunResults) -> Finding | None:
    """FT-Classifier against Representation Surgery at equal sample counts (the table's shots when run)."""
    methods, shots, values = surgery_series(results)
    if not methods or not shots:
        return None
    k = results.shots if results.shots in shots else shots[-1]
    pairs = [(values[(m, "ft_classifier", k)], values[(m, "surgery", k)]) for m in methods
             if (m, "ft_classifier", k) in values and (m, "surgery", k) in values]  # fmt: skip
    if not pairs:
        return None
    wins = sum(ft > sg for ft, sg in pairs)
    gap = mean(ft - sg for ft, sg in pairs)
    text = (
        f"At k = {k} per class, FT-Classifier beats Surgery † on {wins} of {len(pairs)} merged models "
        f"({signed(100 * gap)} points on average)."
    )
    return Finding("FT-Classifier vs Surgery", text)


def findings(results: RunResults) -> Findings:
    """Every verdict the run has the rows for, in reading order."""
    made = [
        bounds_finding(results),
        gap_finding(results, "ft_classifier", "FT-Classifier vs Current"),
        gap_finding(results, "ft_classifier:converged", "FT-Classifier solved to convergence"),
        gap_finding(results, "knn", "KNN vs Current"),
        ranking_finding(results),
        experts_finding(results.meta.get("experts") or {}),
        controls_finding(results),
        surgery_finding(results),
    ]
    return Findings(tuple(f for f in made if f is not None))
