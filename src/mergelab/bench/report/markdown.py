"""The report as Markdown (readable on GitHub; figures linked as the PNG files beside it)."""

from __future__ import annotations

from mergelab.bench.report.model import Block, Cell, Figure, Findings, Paragraph, Report, Table


def cell_markdown(cell: Cell) -> str:
    """A cell's text, '|' escaped, in bold when it is the best of its column."""
    text = cell.text.replace("|", "\\|")
    return f"**{text}**" if cell.best else text


def markdown_table(table: Table) -> str:
    """A GitHub pipe table, then its note (if any)."""
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(cell_markdown(c) for c in r.cells) + " |" for r in table.rows]
    text = "\n".join(lines)
    return f"{text}\n\n{table.note}" if table.note else text


def block_markdown(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Findings):
        return "\n".join(f"- **{item.title}.** {item.text}" for item in block.items)
    if isinstance(block, Table):
        return markdown_table(block)
    if isinstance(block, Figure):
        return f"![{block.title}]({block.file})\n\n*{block.title}.* {block.caption}"
    raise TypeError(f"not a report block: {block!r}")


def markdown_blocks(blocks: tuple[Block, ...] | list[Block]) -> str:
    """Blocks as Markdown, separated by blank lines."""
    return "\n\n".join(block_markdown(b) for b in blocks)


def render_markdown(report: Report) -> str:
    """The whole report: title, intro, then each section's heading and blocks."""
    parts = [f"# {report.title}", report.intro, report.legend]
    for section in report.sections:
        parts += [f"## {section.title}", markdown_blocks(section.blocks)]
    return "\n\n".join(parts) + "\n"
