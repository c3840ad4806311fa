"""`vqabench tune`'s console front end: tune the selected presets, then print the Tuned table.

One line per trial and run as they end; at the end one row per preset: the rows of
:func:`vqabench.tune.summary.tuned_rows`, recorded in the results store and drawn as the report's
Tuned table read back from it, so the console, the export and the dashboard cannot disagree.
Exit code 0 when every preset has a tuned run that is done, 1 otherwise, 130 after Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vqabench.presets import Overrides, select_presets
from vqabench.report import ReportTable
from vqabench.report import tuned_table as report_tuned_table
from vqabench.runner import FINAL_STATUSES, Notification, RunStatusChanged
from vqabench.spec import SpecError
from vqabench.store import ResultsStore
from vqabench.tune.study import Tuner, TuneSettings, open_storage, shown_url, storage_url
from vqabench.tune.summary import tuned_rows

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


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
    settings.validate()
    chosen = select_presets(selection, overrides)
    if any("@s" in s.name for s in chosen.specs):
        raise SpecError("--seeds cannot be combined with tune; each trial runs one seed (set it with --seed).")
    console = console or Console(highlight=False, soft_wrap=True)
    with ResultsStore(results_dir) as store:
        open_storage(storage_url(settings.storage, store.results_dir))  # one sentence before a session is recorded
        session = store.begin_session(selection, command)

        def show(note: Notification) -> None:
            if isinstance(note, RunStatusChanged) and note.status in FINAL_STATUSES:
                console.print(f"[{note.run}] {note.status}" + (f": {note.reason}" if note.reason else ""), markup=False)

        tuner = Tuner(
            chosen.specs,
            settings,
            store,
            session,
            worker_cmd=worker_cmd,
            cache_dir=cache_dir,
            subscribers=[show],
            say=lambda text: console.print(text, markup=False),
        )
        console.print(
            f"Session {session.id}: tuning {', '.join(s.name for s in chosen.specs)} with {settings.trials} "
            f"trial(s) each; studies {tuner.study_base}.<preset> in {shown_url(tuner.url)}",
            markup=False,
        )
        try:
            outcomes = tuner.run()
        except KeyboardInterrupt:
            tuner.interrupted = True
            outcomes = tuner.outcomes
        studies = [(name, tuner.study_name(name)) for name in outcomes if outcomes[name].reason != "interrupted"]
        rows = tuned_rows(store, session.id, open_storage(tuner.url), studies)
        store.add_tuned(session.id, [row.record(shown_url(tuner.url)) for row in rows])
        store.finish_session(session.id, "cancelled" if tuner.interrupted else "done")
        table = report_tuned_table(store, session.id)
        if table is not None:  # the rows the export and the dashboard show, read back from the store
            console.print(tuned_table(table))
            for note in table.notes[1:]:
                console.print(note, markup=False)
        for outcome in outcomes.values():
            if outcome.reason:
                console.print(f"{outcome.preset}: {outcome.reason}", markup=False)
    if tuner.interrupted:
        return EXIT_INTERRUPTED
    done = all(o.final_state is not None and o.final_state.status == "done" for o in outcomes.values())
    return EXIT_OK if done and len(outcomes) == len(chosen.specs) else EXIT_FAILED


def tuned_table(table: ReportTable) -> Table:
    """The report's Tuned table (read back from the store) as a rich table."""
    rich_table = Table(title=table.title, title_justify="left")
    for column, align in zip(table.columns, table.align, strict=True):  # Text: "[s]" is no markup
        rich_table.add_column(Text(column), justify="right" if align == "right" else "left")
    for row in table.rows:
        rich_table.add_row(*map(Text, row))
    return rich_table
