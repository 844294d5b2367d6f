"""The report as one self-contained HTML page: a table of contents, the summary, tables with the best value of
each column and transductive rows marked, and the figures embedded as base64 PNG with their captions."""

from __future__ import annotations

import base64
import re
from html import escape

from mergelab.bench.report.model import (
    MISSING,
    Block,
    Cell,
    Figure,
    Findings,
    Paragraph,
    Report,
    Row,
    Section,
    Table,
)

NUM = ' class="num"'
WIDE = 140  # characters (estimated) beyond which a table's labels may wrap to let it fit the page
NUMERIC = re.compile(r"^[\d\s.,±+\-−/()%‡✓eE" + MISSING + r"]*$")  # cells right-aligned as numbers

CSS = """
body{font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",sans-serif;color:#1f2328;
  max-width:1180px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:28px;margin:8px 0 4px}
h2{font-size:21px;margin:40px 0 10px;padding-bottom:4px;border-bottom:1px solid #d8dee4}
p{margin:8px 0;max-width:980px}
p.intro{color:#57606a}
nav.toc{background:#f6f8fa;border:1px solid #d8dee4;border-radius:6px;padding:6px 20px 10px;margin:18px 0}
nav.toc h2{border:0;margin:6px 0;font-size:16px}
nav.toc ol{columns:2;margin:0;padding-left:22px}
nav.toc a{color:#0969da;text-decoration:none}
nav.toc a:hover{text-decoration:underline}
ul.findings{padding-left:20px;max-width:980px}
ul.findings li{margin:6px 0}
.table-wrap{overflow-x:auto;margin:10px 0 14px}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dee4;padding:3px 8px;vertical-align:top}
th{background:#f6f8fa;font-weight:600;vertical-align:bottom;text-align:left;min-width:4em}
td.num{text-align:right;white-space:nowrap}
td.label{white-space:nowrap}
table.wide td.label{white-space:normal;min-width:10em}
th.num{text-align:right}
tbody tr:nth-child(even) td{background:#fafbfc}
td.best{background:#dafbe1 !important;font-weight:700}
tr.transductive td{background:#fff8e5 !important;font-style:italic}
tr.transductive td:first-child{box-shadow:inset 3px 0 0 #d4a72c}
td.warn{color:#9a6700;background:#fff8c5 !important}
p.note{font-size:13px;color:#57606a;margin-top:-6px}
p.legend{font-size:13px;color:#57606a}
.swatch{display:inline-block;border:1px solid #d8dee4;padding:0 6px;margin-right:6px;font-size:12px}
.swatch.best{background:#dafbe1;font-weight:700}
.swatch.transductive{background:#fff8e5;font-style:italic;box-shadow:inset 3px 0 0 #d4a72c}
figure{margin:18px 0}
figure img{max-width:100%;height:auto}
figcaption{font-size:14px;color:#57606a;max-width:980px}
details{margin:10px 0}
details>summary{cursor:pointer;color:#0969da}
"""


def numeric_columns(table: Table) -> set[int]:
    """The value columns whose every cell reads as a number (right-aligned)."""
    width = len(table.header)
    return {
        col
        for col in range(table.label_columns, width)
        if all(col >= len(r.cells) or NUMERIC.match(r.cells[col].text) for r in table.rows)
    }


def text_width(table: Table) -> int:
    """The table's width in characters, estimated: each column's longest cell (headers wrap, so half of theirs)."""
    columns = zip(*[r.cells for r in table.rows], strict=False)
    longest = [max(len(c.text) for c in column) for column in columns]
    return sum(max(width, len(h) // 2) for width, h in zip(longest, table.header, strict=False))


def cell_html(cell: Cell, numeric: bool, label: bool = False) -> str:
    marks = (("label", label), ("num", numeric), ("best", cell.best), ("warn", cell.text.startswith("⚠")))
    classes = [name for name, on in marks if on]
    attrs = (f' class="{" ".join(classes)}"' if classes else "") + (
        f' title="{escape(cell.note)}"' if cell.note else ""
    )
    text = escape(cell.text)
    return f"<td{attrs}><strong>{text}</strong></td>" if cell.best else f"<td{attrs}>{text}</td>"


def row_html(r: Row, numeric: set[int], label_columns: int) -> str:
    cls = ' class="transductive"' if r.transductive else ""
    cells = "".join(cell_html(c, i in numeric, i < label_columns) for i, c in enumerate(r.cells))
    return f"<tr{cls}>{cells}</tr>"


def table_html(table: Table) -> str:
    """The table (in a horizontally scrolling box), its note, folded when ``collapsed``."""
    numeric = numeric_columns(table)
    head = "".join(f"<th{NUM if i in numeric else ''}>{escape(h)}</th>" for i, h in enumerate(table.header))
    body = "".join(row_html(r, numeric, table.label_columns) for r in table.rows)
    wide = ' class="wide"' if text_width(table) > WIDE else ""
    html = f'<div class="table-wrap"><table{wide}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if table.note:
        html += f'<p class="note">{escape(table.note)}</p>'
    if table.collapsed:
        html = f"<details><summary>Show the table ({len(table.rows)} rows)</summary>{html}</details>"
    return html


def figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.title)}">'
        f"<figcaption><strong>{escape(figure.title)}.</strong> {escape(figure.caption)}</figcaption></figure>"
    )


def block_html(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Findings):
        items = "".join(f"<li><strong>{escape(f.title)}.</strong> {escape(f.text)}</li>" for f in block.items)
        return f'<ul class="findings">{items}</ul>'
    if isinstance(block, Table):
        return table_html(block)
    if isinstance(block, Figure):
        return figure_html(block)
    raise TypeError(f"not a report block: {block!r}")


def section_html(section: Section) -> str:
    blocks = "".join(block_html(b) for b in section.blocks)
    return f'<section id="{escape(section.id)}"><h2>{escape(section.title)}</h2>{blocks}</section>'


def toc_html(report: Report) -> str:
    items = "".join(f'<li><a href="#{escape(s.id)}">{escape(s.title)}</a></li>' for s in report.sections)
    return f'<nav class="toc"><h2>Contents</h2><ol>{items}</ol></nav>'


SWATCHES = '<span class="swatch best">best</span><span class="swatch transductive">transductive †</span>'


def render_html(report: Report) -> str:
    """The whole report as one self-contained page."""
    body = (
        f'<header><h1>{escape(report.title)}</h1><p class="intro">{escape(report.intro)}</p>'
        f'<p class="legend">{SWATCHES}{escape(report.legend)}</p></header>'
        + toc_html(report)
        + "<main>"
        + "".join(section_html(s) for s in report.sections)
        + "</main>"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(report.title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
