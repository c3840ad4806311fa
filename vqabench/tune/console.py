"""`vqabench tune`'s console front end: tune the selected presets, then print the Tuned table.

One line per trial and run as they end; at the end one row per preset (the rows of
:func:`vqabench.tune.summary.tuned_rows`). Exit code 0 when every preset has a tuned run that is
done, 1 otherwise, 130 after Ctrl-C or SIGTERM (the running trial is recorded failed, "interrupted";
the same command again continues the study).
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vqabench.presets import Overrides, select_presets
from vqabench.runner import FINAL_STATUSES, Notification, RunStatusChanged
from vqabench.spec import SpecError
from vqabench.store import ResultsStore
from vqabench.tune.study import Tuner, TuneSettings, open_storage, shown_url, storage_url
from vqabench.tune.summary import TunedRow, tuned_rows

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
            with _stop_on_signals(tuner):
                outcomes = tuner.run()
        except KeyboardInterrupt:
            tuner.interrupted = True
            outcomes = tuner.outcomes
        studies = [(name, tuner.study_name(name)) for name in outcomes if outcomes[name].reason != "interrupted"]
        rows = tuned_rows(store, session.id, open_storage(tuner.url), studies)
        store.finish_session(session.id, "cancelled" if tuner.interrupted else "done")
        console.print(tuned_table(rows))
        for outcome in outcomes.values():
            if outcome.reason:
                console.print(f"{outcome.preset}: {outcome.reason}", markup=False)
    if tuner.interrupted:
        return EXIT_INTERRUPTED
    done = all(o.final_state is not None and o.final_state.status == "done" for o in outcomes.values())
    return EXIT_OK if done and len(outcomes) == len(chosen.specs) else EXIT_FAILED


@contextmanager
def _stop_on_signals(tuner: Tuner) -> Iterator[None]:
    """SIGTERM and SIGINT stop the running trial's worker (the trial is recorded FAIL, "interrupted")
    and start nothing else; a second signal is a KeyboardInterrupt. Only the main thread can listen."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        if tuner.interrupted:
            raise KeyboardInterrupt
        tuner.cancel()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tuned_table(rows: Sequence[TunedRow]) -> Table:
    """The Tuned rows as a rich table (the best setting was retrained and scored on test once)."""
    table = Table(title="Tuned (selected on eval; the best setting retrained, then scored on test once)")
    for header in ("preset", "best setting", "trials run/pruned/failed", "best eval objective (preset's)"):
        table.add_column(header)
    for header in ("test EM ↑", "test F1 ↑", "judge ↑", "tuning", "to a tuned model"):
        table.add_column(header, justify="right")
    for row in rows:
        scores = row.test
        extra: dict[str, Any] = scores.extra if scores else {}
        table.add_row(
            row.preset,
            ", ".join(f"{k} {_value(v)}" for k, v in row.best_params.items()) or "–",
            f"{row.trials} / {row.pruned} / {row.failed} (of {row.budget})",
            _objective(row),
            _score(scores.em if scores else None, extra.get("em_ci")),
            _score(scores.f1 if scores else None, extra.get("f1_ci")),
            _score(scores.judge_score if scores else None, extra.get("judge_ci")),
            _seconds(row.tuning_seconds),
            _seconds(row.to_tuned_seconds) + (f" (with {row.after})" if row.after else ""),
        )
    return table


def _objective(row: TunedRow) -> str:
    if row.best_value is None:
        return "–"
    own = f" ({row.preset_value:.4f})" if row.preset_value is not None else ""
    return f"{row.objective} {row.best_value:.4f}{own}, trial {row.best_trial}"


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _score(value: float | None, interval: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
