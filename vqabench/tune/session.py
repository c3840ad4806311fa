"""One `vqabench tune` session, whichever front end starts it (`tune`'s console, the dashboard's `u`).

Records a session, tunes the selected presets through :class:`~vqabench.tune.study.Tuner`,
records what each came to in the results store (:meth:`~vqabench.store.ResultsStore.add_tuned`)
and reads the report's Tuned table back from it, so every front end shows the same rows.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vqabench.presets import Overrides, select_presets
from vqabench.report import ReportTable, tuned_table
from vqabench.runner import Notification
from vqabench.spec import SpecError
from vqabench.store import ResultsStore, SessionRecord
from vqabench.tune.study import Tuned, Tuner, TuneSettings, open_storage, shown_url, storage_url
from vqabench.tune.summary import tuned_rows

#: The trials per preset that the dashboard's `u` spends (`vqabench tune --trials N` names its own).
DEFAULT_TRIALS = 20

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class TuneResult:
    """What a tune session came to: its id, each preset's outcome, the Tuned table and the exit code."""

    session_id: int
    outcomes: dict[str, Tuned]
    table: ReportTable | None
    interrupted: bool
    exit_code: int


def tune_session(
    selection: str,
    overrides: Overrides,
    results_dir: Path | str,
    settings: TuneSettings,
    *,
    worker_cmd: Sequence[str] | None = None,
    cache_dir: Path | str | None = None,
    command: str = "",
    subscribers: Sequence[Callable[[Notification], None]] = (),
    say: Callable[[str], None] = print,
    on_start: Callable[[SessionRecord, Tuner], None] | None = None,
) -> TuneResult:
    """Tune the selected presets in a new session of the store at `results_dir`.

    `on_start` gets the session and its tuner once it is recorded (a front end may cancel the tuner
    from another thread). SpecError (one sentence) before any session is recorded: a selection that
    cannot be tuned, a storage that cannot be opened."""
    settings.validate()
    chosen = select_presets(selection, overrides)
    if any("@s" in s.name for s in chosen.specs):
        raise SpecError("--seeds cannot be combined with tune; each trial runs one seed (set it with --seed).")
    with ResultsStore(results_dir) as store:
        open_storage(storage_url(settings.storage, store.results_dir))  # one sentence before a session is recorded
        session = store.begin_session(selection, command)
        tuner = Tuner(
            chosen.specs,
            settings,
            store,
            session,
            worker_cmd=worker_cmd,
            cache_dir=cache_dir,
            subscribers=subscribers,
            say=say,
        )
        say(
            f"Session {session.id}: tuning {', '.join(s.name for s in chosen.specs)} with {settings.trials} "
            f"trial(s) each; studies {tuner.study_base}.<preset> in {shown_url(tuner.url)}"
        )
        if on_start is not None:
            on_start(session, tuner)
        try:
            with _stop_on_signals(tuner):
                outcomes = tuner.run()
        except KeyboardInterrupt:
            tuner.interrupted = True
            outcomes = tuner.outcomes
        studies = [(name, tuner.study_name(name)) for name in outcomes if outcomes[name].reason != "interrupted"]
        rows = tuned_rows(store, session.id, open_storage(tuner.url), studies)
        store.add_tuned(session.id, [row.record(shown_url(tuner.url)) for row in rows])
        store.finish_session(session.id, "cancelled" if tuner.interrupted else "done")
        table = tuned_table(store, session.id)
    done = all(o.final_state is not None and o.final_state.status == "done" for o in outcomes.values())
    if tuner.interrupted:
        code = EXIT_INTERRUPTED
    else:
        code = EXIT_OK if done and len(outcomes) == len(chosen.specs) else EXIT_FAILED
    return TuneResult(session.id, outcomes, table, tuner.interrupted, code)


@contextmanager
def _stop_on_signals(tuner: Tuner) -> Iterator[None]:
    """SIGTERM and SIGINT stop the running trial's worker (the trial is recorded FAIL, "interrupted")
    and start nothing else; a second signal is a KeyboardInterrupt. Only the main thread can listen
    (the dashboard tunes in a thread and stops the tuner itself)."""
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
