"""The report built from a run folder: its sections as data (``Report``), then written as Markdown and HTML.

Everything here reads the results store (and the t-SNE coordinates saved by the runner) and summarises it with
``mergelab.evaluation.results.summarize``; it computes nothing new, so the report's numbers are the store's numbers.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.bench.report.facts import chosen_blocks, facts_blocks, learned_table, units_table
from mergelab.bench.report.figures import (
    figure_aligned,
    figure_expert_losses,
    figure_shots,
    figure_surgery,
    figure_tsne,
)
from mergelab.bench.report.findings import findings
from mergelab.bench.report.html import render_html
from mergelab.bench.report.markdown import render_markdown
from mergelab.bench.report.model import (
    NO_SHARED_SEED,
    Block,
    Figure,
    Paragraph,
    Report,
    Section,
    Table,
    has_no_shared_seed,
)
from mergelab.bench.report.run import RunResults, load_run
from mergelab.bench.report.tables import (
    aligned_table,
    every_protocol_table,
    experts_table,
    ft_kl_table,
    main_results_table,
    neulig_table,
    surgery_table,
)
from mergelab.bench.report.verdict import verdict_section
from mergelab.evaluation.protocols.ft_classifier import CONVERGED_TOLERANCE
from mergelab.io.writer import atomic_write_text

TITLE = "mergelab benchmark report"
KL_TEXT = (
    "The reference schedule is the paper's code (Adam 5e-4, 5 epochs, batch 1: 5·k·C steps); the converged solver "
    "minimises the same KL(p_fine-tuned ‖ p_student) on the same few-shot inputs from the same initialisation by "
    "full-batch L-BFGS until max |gradient| ≤ its tolerance "
    f"(default {CONVERGED_TOLERANCE:g}). KL = full-batch KL on those inputs (convex in a linear head, so the "
    "converged value is its minimum up to that tolerance)."
)
ALIGNED_TEXT = (
    "Each family is fitted on half of the unlabelled test inputs and scored on the other half, both ways (every "
    "item scored once, by the map that did not see it); the control runs the same procedure with the merged rows "
    "shuffled against the fine-tuned rows and labels (each item paired with another item's merged features), so "
    "it should score chance: Σ_c p_c q_c, the accuracy of predictions independent of the labels with the "
    "control's own predicted-class frequencies q (at most the majority rate). In-sample columns (if run) fit and "
    "score the same items: they measure capacity, not alignment."
)
EXPERTS_TEXT = (
    "Each expert against the frozen-encoder linear probe and the majority-class rate (an expert that does not "
    "beat its probe is under-trained, so no upper bound); head moved = relative change of the head weight during "
    "fine-tuning."
)


def figure(file: str, title: str, caption: str, data: bytes | None) -> tuple[Figure, ...]:
    """The figure as a block (none when it could not be drawn)."""
    return (Figure(file, title, caption, data),) if data else ()


def section(id_: str, title: str, *blocks: Block | None) -> Section | None:
    """A section of the given blocks (None ones dropped); None when no block is left."""
    kept = tuple(b for b in blocks if b is not None)
    return Section(id_, title, kept) if kept else None


def intro(results: RunResults) -> str:
    """What the numbers are."""
    return f"Accuracy (%) on the test split, mean ± std over seeds; few-shot rows use {results.shots} shots per class."


def legend(tables: list[Table]) -> str:
    """The key to the tables' marks (‡ only when a table has such a cell)."""
    text = (
        "Bold: the best merged model of a column (transductive rows do not compete); † marks transductive rows "
        "(fitted on unlabelled test inputs)."
    )
    if has_no_shared_seed(tables):
        text += f" {NO_SHARED_SEED}: the average of the per-task means (no seed is shared by every task, so no std)."
    return text


def results_sections(results: RunResults) -> list[Section | None]:
    """Summary, Table 2 with Figure 5, the experts, the FT-Classifier solvers and the verdict."""
    shots_caption = (
        "Task-average test accuracy (%) of each merged method against the labelled shots per class: KNN and "
        "FT-Classifier with the reference schedule and solved to convergence (error bars: std over seeds); the "
        "dashed line is the method's Current accuracy, which uses no shots."
    )
    experts = results.meta.get("experts") or {}
    losses_caption = (
        "Each expert's train loss per optimiser step during fine-tuning (running mean over ~2 % of the steps)."
    )
    return [
        section("summary", "Summary", findings(results)),
        section("table-2", "Table 2 (+ Table 3's pretrained rows and the ensemble)", main_results_table(results)),
        section("figure-5", "Figure 5: accuracy against shots",
                *figure("fig5_shots.png", "Figure 5: accuracy against shots", shots_caption, figure_shots(results))),
        section("experts", "Experts: are the upper bounds bounds?", Paragraph(EXPERTS_TEXT) if experts else None,
                experts_table(experts),
                *figure("fig_expert_losses.png", "Experts' train loss", losses_caption, figure_expert_losses(experts))),
        section("ft-classifier-solvers", "FT-Classifier: reference schedule vs the solved head refit",
                *_with_text(KL_TEXT, ft_kl_table(results))),
        section("verdict", "Does the protocol change the verdict?", *verdict_section(results, results.shots)),
    ]  # fmt: skip


def _with_text(text: str, table: Block | None) -> tuple[Block, ...]:
    """The explaining paragraph and its table, or nothing without the table."""
    return (Paragraph(text), table) if table is not None else ()


def figure_sections(results: RunResults, run_dir: Path) -> list[Section | None]:
    """Figure 4 (aligned), Figure 7 (Surgery), NeuLig and Figure 1 (t-SNE)."""
    aligned_caption = (
        "Per merged method, each aligned family's held-out (cross-fitted) task-average accuracy beside its "
        "shuffled-pairs noise control (grey, hatched); dashed: the fine-tuned bound, dash-dotted: the method's "
        "Current accuracy, dotted: chance (majority class). Every bar is transductive: the maps are fitted on "
        "unlabelled test inputs."
    )
    surgery_caption = (
        "Task-average accuracy of FT-Classifier (labelled few-shot) and Representation Surgery † (unlabelled) "
        "against the samples per class k, mean over the merged models (thin lines: each model); dotted: Surgery on "
        "every test input."
    )
    tsne_caption = (
        "t-SNE of each task's test features from its fine-tuned encoder (●) and from the merged encoder (▲), "
        "coloured by label: how far merging moves the features the fine-tuned head was trained on."
    )
    return [
        section("figure-4", "Figure 4: aligned transforms (average accuracy %, † transductive)",
                *_with_text(ALIGNED_TEXT, aligned_table(results)),
                *figure("fig4_aligned.png", "Figure 4: aligned maps vs their noise controls", aligned_caption,
                        figure_aligned(results))),
        section("figure-7", "Figure 7: FT-Classifier vs Representation Surgery (average accuracy %, equal "
                "unlabelled samples: k per class × classes)", surgery_table(results),
                *figure("fig7_surgery.png", "Figure 7: FT-Classifier vs Surgery", surgery_caption,
                        figure_surgery(results))),
        section("neulig", "NeuLig: merging vs ensembling (router trained on the experts' train features)",
                neulig_table(results)),
        section("figure-1", "Figure 1: fine-tuned vs merged features (t-SNE)",
                *figure("fig1_tsne.png", "Figure 1: t-SNE of fine-tuned and merged features", tsne_caption,
                        figure_tsne(run_dir))),
    ]  # fmt: skip


def record_sections(results: RunResults) -> list[Section | None]:
    """Every protocol (folded), the chosen hyper-parameters, what the merges learned, the run's facts."""
    meta = results.meta
    learned = meta.get("learned")
    return [
        section("every-protocol", "Every protocol, model and shot count", every_protocol_table(results)),
        section("hyper-parameters", "Hyper-parameters chosen on the validation split",
                *chosen_blocks(meta.get("chosen") or {}, meta.get("selection") or {})),
        section("learned", "What the data-dependent merges learned or chose",
                learned_table(learned) if learned else None),
        section("run-facts", "Run facts", *facts_blocks(meta)),
        section("units", "Where the units ran", units_table(meta.get("units") or {})),
    ]  # fmt: skip


def build_document(results: RunResults, run_dir: Path) -> Report:
    """The whole report as data."""
    made = [*results_sections(results), *figure_sections(results, run_dir), *record_sections(results)]
    sections = tuple(s for s in made if s is not None)
    tables = [b for s in sections for b in s.blocks if isinstance(b, Table)]
    return Report(TITLE, intro(results), legend(tables), sections)


def build_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html (figures embedded) and the PNG figures into ``run_dir``."""
    run_dir = Path(run_dir)
    report = build_document(load_run(run_dir), run_dir)
    for fig in report.figures():
        (run_dir / fig.file).write_bytes(fig.png)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    atomic_write_text(run_dir / "report.html", render_html(report))
    return {"markdown": run_dir / "report.md", "html": run_dir / "report.html"}
