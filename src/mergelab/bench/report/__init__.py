"""The benchmark report: built from a run folder's results store as one data model (``model.Report``) and
rendered to Markdown and to a self-contained HTML page.

Layout: ``run`` (the store's rows, their summary and the run's metadata), ``tables``/``verdict``/``facts``/
``findings``/``figures`` (the sections' content), ``build`` (the sections, and writing the files),
``markdown``/``html`` (the two renderers), ``labels`` (display names), ``model`` (the data model).
"""

from __future__ import annotations

from mergelab.bench.report.build import build_document, build_report
from mergelab.bench.report.figures import figure_aligned, figure_shots, figure_surgery
from mergelab.bench.report.html import render_html
from mergelab.bench.report.labels import FT_CLASSIFIERS, aligned_kind, protocol_label
from mergelab.bench.report.markdown import markdown_table, render_markdown
from mergelab.bench.report.run import RunResults, config_methods, load_run, method_order, table_shots, task_order
from mergelab.bench.report.tables import (
    aligned_table,
    expert_verdict,
    experts_table,
    ft_kl_table,
    main_results_table,
    main_table,
    surgery_table,
)
from mergelab.bench.report.verdict import (
    biggest_movers,
    kendall_matrix,
    rank_methods,
    verdict_scores,
    verdict_section,
)

__all__ = [
    "FT_CLASSIFIERS",
    "RunResults",
    "aligned_kind",
    "aligned_table",
    "biggest_movers",
    "build_document",
    "build_report",
    "config_methods",
    "expert_verdict",
    "experts_table",
    "figure_aligned",
    "figure_shots",
    "figure_surgery",
    "ft_kl_table",
    "kendall_matrix",
    "load_run",
    "main_results_table",
    "main_table",
    "markdown_table",
    "method_order",
    "protocol_label",
    "rank_methods",
    "render_html",
    "render_markdown",
    "surgery_table",
    "table_shots",
    "task_order",
    "verdict_scores",
    "verdict_section",
]
