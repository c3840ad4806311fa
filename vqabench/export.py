"""Writing the report to a file, with its SVG figures: one export for `vqabench export`,
``--export`` and the dashboard's export key; the JSON report for ``--format json`` and ``--json``.
No textual import here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vqabench.report import SessionReport, render_json, report_markdown


@dataclass
class Export:
    """What was written: the Markdown file and the figures it links to."""

    path: Path
    figures: list[Path] = field(default_factory=list)


def export_report(report: SessionReport, path: Path | str, *, figures: bool = True) -> Export:
    """Write `report` as Markdown to `path`; with `figures`, also SVG charts into
    `<stem>_files/` next to it, linked with relative paths. Raises OSError or FigureError."""
    path = Path(path)
    written = []
    links: list[tuple[str, str]] = []
    if figures and (report.runs or report.tuned):
        from vqabench.figures import figure_links, figures_dir, write_figures  # matplotlib: only now

        written = write_figures(report, figures_dir(path))
        links = figure_links(written, path)
    path.write_text(report_markdown(report, links), encoding="utf-8")
    return Export(path, [f.path for f in written])


def export_json(report: SessionReport, path: Path | str) -> Path:
    """Write `report` as JSON (vqabench/assets/report.schema.json) to `path`. Raises OSError."""
    path = Path(path)
    path.write_text(render_json(report), encoding="utf-8")
    return path
