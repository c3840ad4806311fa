"""The Markdown renderer: a :class:`~vqabench.report.session.SessionReport` as the text `vqabench export` writes."""

from __future__ import annotations

from collections.abc import Sequence

from vqabench.report.epochs import EPOCH_NOTE
from vqabench.report.model import (
    ReportTable,
)
from vqabench.report.session import SessionReport, build_report
from vqabench.store import ResultsStore


def render_markdown(store: ResultsStore, session_id: int, per_seed: bool = False) -> str:
    """The Markdown report of one stored session (vqabench export, --export, the dashboard)."""
    return report_markdown(build_report(store, session_id, per_seed))


def report_markdown(report: SessionReport, figures: Sequence[tuple[str, str]] = ()) -> str:
    """A SessionReport as Markdown: first line, unfinished runs, tables with their notes, and
    `figures` ((caption, relative path) of images written next to it) after the tables."""
    parts = [report.header, ""]
    if report.unfinished:
        parts += ["Runs that did not finish:", ""]
        parts += [f"- {line}" for line in report.unfinished]
        parts.append("")
    for table in report.tables:
        parts += _markdown_section("##", table)
    if figures:
        parts += ["## Figures", ""]
        for caption, link in figures:
            parts += [f"![{caption}]({link.replace(' ', '%20')})", "", f"*{caption}*", ""]
    if report.epoch_tables:
        parts += ["## Per epoch", "", EPOCH_NOTE, ""]
        for table in report.epoch_tables:
            parts += _markdown_section("###", table)
    return "\n".join(parts).rstrip("\n") + "\n"


def _markdown_section(level: str, table: ReportTable) -> list[str]:
    lines = [f"{level} {table.title}", "", *markdown_table(table)]
    if table.notes:
        lines += ["", *table.notes]
    return [*lines, ""]


def markdown_table(table: ReportTable) -> list[str]:
    """Pipe-table lines, columns padded to their widest cell, numbers right-aligned."""
    cells = [table.columns, *table.rows]
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(table.columns))]

    def line(row: list[str]) -> str:
        padded = [c.rjust(w) if a == "right" else c.ljust(w) for c, w, a in zip(row, widths, table.align, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a == "right" else (":" + "-" * (w + 1))
            for w, a in zip(widths, table.align, strict=True)
        )
        + "|"
    )
    return [line(cells[0]), rule, *(line(row) for row in cells[1:])]
