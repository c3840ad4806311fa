"""`vqabench tune`'s console front end: tune the selected presets, then print the Tuned table.

One line per trial and run as they end; at the end one row per preset: the rows of
:func:`vqabench.tune.summary.tuned_rows`, recorded in the results store and drawn as the report's
Tuned table read back from it, so the console, the export and the dashboard cannot disagree.
Exit code 0 when every preset has a tuned run that is done, 1 otherwise, 130 after Ctrl-C or SIGTERM
(the running trial is recorded failed, "interrupted"; the same command again continues the study).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vqabench.presets import Overrides
from vqabench.report import ReportTable
from vqabench.runner import FINAL_STATUSES, Notification, RunStatusChanged
from vqabench.tune.session import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, tune_session
from vqabench.tune.study import TuneSettings

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "run_tune", "tuned_table"]


def run_tune(
    selection: str,
    overrides: Overrides,
    results_dir: Path | str,
    settings: TuneSettings,
    *,
    worker_cmd: Sequence[str] | None = None,
    cache_dir: Path | str | None = None,
    console: Console | None = None,
    command: str = "",
) -> int:
    """Tune the selected presets, store every run, print the Tuned table; return the exit code."""
    console = console or Console(highlight=False, soft_wrap=True)

    def show(note: Notification) -> None:
        if isinstance(note, RunStatusChanged) and note.status in FINAL_STATUSES:
            console.print(f"[{note.run}] {note.status}" + (f": {note.reason}" if note.reason else ""), markup=False)

    result = tune_session(
        selection,
        overrides,
        results_dir,
        settings,
        worker_cmd=worker_cmd,
        cache_dir=cache_dir,
        command=command,
        subscribers=[show],
        say=lambda text: console.print(text, markup=False),
    )
    if result.table is not None:  # the rows the export and the dashboard show, read back from the store
        console.print(tuned_table(result.table))
        for note in result.table.notes[1:]:
            console.print(note, markup=False)
    for outcome in result.outcomes.values():
        if outcome.reason:
            console.print(f"{outcome.preset}: {outcome.reason}", markup=False)
    return result.exit_code


def tuned_table(table: ReportTable) -> Table:
    """The report's Tuned table (read back from the store) as a rich table."""
    rich_table = Table(title=table.title, title_justify="left")
    for column, align in zip(table.columns, table.align, strict=True):  # Text: "[s]" is no markup
        rich_table.add_column(Text(column), justify="right" if align == "right" else "left")
    for row in table.rows:
        rich_table.add_row(*map(Text, row))
    return rich_table
