"""Does the protocol change the verdict? The merged methods ranked under each protocol, Kendall τ between the
protocols' rankings, and the methods whose rank moves most from Current."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from statistics import mean

from mergelab.bench.report.labels import FT_CLASSIFIERS, dagger, protocol_label
from mergelab.bench.report.model import MISSING, Block, Paragraph, Table, row
from mergelab.bench.report.run import RowLike, RunResults, as_results
from mergelab.evaluation.results import ModelKind

VERDICT_PROTOCOLS = ("current", "knn", *FT_CLASSIFIERS, "linear_probe")
Scores = dict[str, dict[str, float]]  # protocol → method → task-average accuracy


def verdict_scores(rows: RunResults | Iterable[RowLike], shots: int, methods: list[str] | None = None) -> Scores:
    """protocol → merged method → task-average test accuracy (mean over seeds): few-shot protocols at ``shots``,
    the others (Current, the aligned families — fitted, not their shuffled-pairs controls) at their single cell.
    Protocols no method has are left out."""
    results = as_results(rows, methods)
    merged = results.summary.select(model=ModelKind.MERGED)
    aligned = sorted(
        {
            g.key.protocol
            for g in merged
            if g.key.protocol.split(":", 1)[0] in ("aligned", "aligned-insample") and ":" in g.key.protocol
        }
    )
    out: Scores = {}
    for protocol in (*VERDICT_PROTOCOLS, *aligned):
        scores = {}
        for method in results.methods:
            stat = results.average(ModelKind.MERGED, method, protocol, shots) or results.average(
                ModelKind.MERGED, method, protocol, 0
            )
            if stat is not None:
                scores[method] = stat.mean
        if scores:
            out[protocol] = scores
    return out


def rank_methods(scores: dict[str, float]) -> dict[str, float]:
    """Rank of each method, 1 = highest score; tied scores share the mean of the ranks they span."""
    ordered = sorted(scores.values(), reverse=True)
    return {m: mean(i + 1 for i, v in enumerate(ordered) if v == s) for m, s in scores.items()}


def kendall_matrix(scores: Scores) -> dict[tuple[str, str], float]:
    """Kendall τ (τ-b, ties allowed) between every ordered pair of protocols, over the methods both scored; NaN
    when fewer than two methods are shared or one side ranks them all equal."""
    from scipy.stats import kendalltau  # imported here: scipy.stats takes ~1.6 s to import (measured)

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


def biggest_movers(scores: Scores, base: str = "current") -> dict[str, list[tuple[str, float, float]]]:
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
        out[protocol] = [
            (m, before[m], after[m]) for m in common if largest > 0 and abs(after[m] - before[m]) == largest
        ]
    return out


def _rank(ranks: dict[str, float], scores: dict[str, float], method: str) -> str:
    """'rank (accuracy %)' of a method under one protocol, '–' when not scored."""
    return f"{ranks[method]:g} ({100 * scores[method]:.1f})" if method in scores else MISSING


def tau_text(tau: float) -> str:
    return MISSING if math.isnan(tau) else f"{tau:+.2f}"


def transductive_protocols(results: RunResults, protocols: Iterable[str]) -> set[str]:
    """The protocols every merged row of which is transductive (they get the † mark)."""
    merged = results.rows_of(ModelKind.MERGED)
    return {p for p in protocols if all(r.transductive for r in merged if r.protocol == p)}


def verdict_section(
    rows: RunResults | Iterable[RowLike], shots: int, methods: list[str] | None = None
) -> tuple[Block, ...]:
    """The ranking of the merged methods under each protocol, Kendall τ between protocols, the biggest movers
    (nothing when fewer than two protocols or methods were scored)."""
    results = as_results(rows, methods)
    scores = verdict_scores(results, shots)
    if len(scores) < 2 or max(len(s) for s in scores.values()) < 2:
        return ()
    marked = transductive_protocols(results, scores)
    labels = [dagger(protocol_label(p), p in marked) for p in scores]
    ranks = {p: rank_methods(s) for p, s in scores.items()}
    rank_rows = [
        row(
            [dagger(m, results.transductive_method(m)), *[_rank(ranks[p], scores[p], m) for p in scores]],
            transductive=results.transductive_method(m),
        )
        for m in results.methods
        if any(m in s for s in scores.values())
    ]
    taus = kendall_matrix(scores)
    tau_rows = [
        row([label, *[tau_text(taus[(a, b)]) for b in scores]]) for a, label in zip(scores, labels, strict=True)
    ]
    blocks: list[Block] = [
        Paragraph(
            "Merged methods (each at its chosen grid value) ranked by task-average test accuracy, mean over seeds; "
            f"few-shot protocols at {shots} shots per class. Rank 1 = best; the accuracy (%) is in brackets; † "
            "transductive. τ = Kendall's τ-b over the methods both protocols scored (+1: same order, −1: reversed)."
        ),
        Table(("method", *labels), tuple(rank_rows)),
        Paragraph("Kendall τ between the protocols' rankings:"),
        Table(("τ", *labels), tuple(tau_rows)),
    ]
    movers = biggest_movers(scores)
    if movers:
        mover_rows = [
            row(
                [
                    dict(zip(scores, labels, strict=True))[p],
                    tau_text(taus.get(("current", p), math.nan)),
                    "; ".join(f"{m} {r0:g} → {r1:g}" for m, r0, r1 in moved) or "no rank moves",
                ]
            )  # fmt: skip
            for p, moved in movers.items()
        ]
        blocks += [
            Paragraph("Methods whose rank moves most from Current (rank under Current → rank under the protocol):"),
            Table(("protocol", "τ with Current", "biggest movers"), tuple(mover_rows)),
        ]
    return tuple(blocks)
