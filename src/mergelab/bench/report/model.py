"""The report as data: sections of paragraphs, findings, tables of typed cells and captioned figures.

Built once from the run's results (``build.py``) and rendered twice, to Markdown and to HTML, so both always show
the same numbers. Text is plain (no Markdown markup): each renderer adds its own emphasis and escaping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mergelab.evaluation.results import Stat

MISSING = "–"
NO_SHARED_SEED = "‡"  # marks a task average taken over per-task means (no seed shared by every task)


@dataclass(frozen=True)
class Cell:
    """One table cell: the text shown, the number a best-value mark compares (higher is better), the mark."""

    text: str
    value: float | None = None
    best: bool = False
    note: str = ""  # a short explanation (HTML title), e.g. why a std is missing


@dataclass(frozen=True)
class Row:
    """A table row; ``transductive`` rows are set apart, ``contender`` rows compete for the best-value mark."""

    cells: tuple[Cell, ...]
    transductive: bool = False
    contender: bool = True


@dataclass(frozen=True)
class Table:
    """A table with its header; the first ``label_columns`` columns are labels, the others values."""

    header: tuple[str, ...]
    rows: tuple[Row, ...]
    note: str = ""  # a remark shown under the table
    label_columns: int = 1
    collapsed: bool = False  # a long appendix table, folded in the HTML


@dataclass(frozen=True)
class Figure:
    """A PNG figure saved as ``file`` in the run folder, with its title and a caption saying what it shows."""

    file: str
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Finding:
    """One verdict of the summary: a short title and the sentence with its numbers."""

    title: str
    text: str


@dataclass(frozen=True)
class Findings:
    items: tuple[Finding, ...]


Block = Paragraph | Findings | Table | Figure


@dataclass(frozen=True)
class Section:
    """A titled part of the report; ``id`` is its anchor (unique in the report)."""

    id: str
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Report:
    """The title, what the numbers are (intro), the key to the tables' marks (legend), the sections."""

    title: str
    intro: str
    legend: str
    sections: tuple[Section, ...]

    def figures(self) -> list[Figure]:
        return [block for section in self.sections for block in section.blocks if isinstance(block, Figure)]


def text_cell(text: object) -> Cell:
    """A label or text cell."""
    return Cell(str(text))


def stat_cell(stat: Stat | None) -> Cell:
    """'mean ± std' of a Stat in percent ('–' when missing); an average without a shared seed is marked ‡."""
    if stat is None:
        return Cell(MISSING)
    if stat.no_shared_seed:
        note = "mean of the per-task means: no seed is shared by every task, so no std"
        return Cell(f"{stat.text()} {NO_SHARED_SEED}", stat.percent(), note=note)
    return Cell(stat.text(), stat.percent())


def percent_cell(value: float | None, digits: int = 1) -> Cell:
    """A fraction shown in percent ('–' when missing)."""
    if value is None:
        return Cell(MISSING)
    return Cell(f"{100 * value:.{digits}f}", round(100 * value, digits))


def row(cells: Iterable[Cell | str], transductive: bool = False, contender: bool = True) -> Row:
    """A Row from cells or plain strings."""
    made = tuple(c if isinstance(c, Cell) else text_cell(c) for c in cells)
    return Row(made, transductive, contender)


def mark_best(rows: Sequence[Row], columns: Iterable[int]) -> tuple[Row, ...]:
    """The rows with the highest value of each column marked best among the contender rows (ties all marked)."""
    marked = [list(r.cells) for r in rows]
    for col in columns:
        values = [r.cells[col].value for r in rows if r.contender and col < len(r.cells)]
        values = [v for v in values if v is not None]
        if not values:
            continue
        top = max(values)
        for cells, r in zip(marked, rows, strict=True):
            if r.contender and col < len(cells) and cells[col].value == top:
                cells[col] = replace(cells[col], best=True)
    return tuple(replace(r, cells=tuple(cells)) for r, cells in zip(rows, marked, strict=True))


def has_no_shared_seed(tables: Iterable[Table]) -> bool:
    """Whether any cell of the tables is a ‡ average."""
    return any(NO_SHARED_SEED in cell.text for table in tables for r in table.rows for cell in r.cells)
