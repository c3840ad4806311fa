"""The Textual dashboard: pick presets, start them, watch epochs arrive, compare, export.

Wiring, the same as the headless front end: a :class:`~vqabench.runner.Runner` (run as a
Textual worker inside the app's event loop) with the store's
:class:`~vqabench.store.SessionRecorder` subscribed first, then this app. The app's
subscriber only posts messages (:mod:`vqabench.tui.messages`); their handlers update the
:class:`~vqabench.tui.state.SessionView` and schedule one redraw for any burst. Quitting
cancels the runner and waits until its worker is gone (SIGTERM, then SIGKILL after the
grace period), so nothing is left running; SIGTERM and SIGHUP (a closed terminal) do the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container
from textual.widgets import DataTable, Footer, Static, Tab, Tabs
from textual.worker import Worker, WorkerCancelled, WorkerFailed, WorkerState

from vqabench.export import Export, export_report
from vqabench.figures import FigureError
from vqabench.launch import check_launch, visible_gpus
from vqabench.presets import Overrides, packaged_presets, read_preset, select_presets
from vqabench.report import SessionReport, build_report, seed_group, tuned_table
from vqabench.runner import (
    DONE,
    FINAL_STATUSES,
    RUNNING,
    Notification,
    Runner,
    RunnerFinished,
    RunStatusChanged,
    status_line,
)
from vqabench.spec import SpecError
from vqabench.store import ResultsStore, SessionRecord, StoreError
from vqabench.trackers.session import SessionTrackers
from vqabench.tui.charts import LossPanel
from vqabench.tui.messages import ProgressNotice, RunnerNotice, notice_for
from vqabench.tui.state import Clock, RunView, SessionView
from vqabench.tui.widgets import (
    EfficiencyPanel,
    EpochPanel,
    LogPanel,
    PresetPicker,
    RunsTable,
    SessionPicker,
)

if TYPE_CHECKING:  # tuning imports Optuna: only when `u` is pressed
    from vqabench.tune.session import TuneResult
    from vqabench.tune.study import Tuner

#: The trials per preset that `u` spends (vqabench.tune.session.DEFAULT_TRIALS; kept here so that
#: opening the dashboard does not import Optuna).
TUNE_TRIALS = 20

#: Redraws wait this long so that a burst of notifications costs one.
REDRAW_DELAY = 0.05
#: Exit status after the terminal hung up (128 + SIGHUP, as a shell reports it).
EXIT_HANGUP = 128 + signal.SIGHUP
#: (tab id, panel id, label) of the lower panels; one at a time on a small terminal.
PANELS = (
    ("tab-epochs", "panel-epochs", "1 Epochs"),
    ("tab-loss", "panel-loss", "2 Loss"),
    ("tab-efficiency", "panel-efficiency", "3 Efficiency"),
    ("tab-log", "panel-log", "4 Log"),
)


class Dashboard(App[int]):
    """Runs table on top; the selected run's epochs, loss plot and log, and the efficiency
    comparison below (all four from 120×40 up, one tab at a time below that)."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses live elsewhere
    TITLE = "vqabench"
    ENABLE_COMMAND_PALETTE = False
    # Textual types these as instance attributes, so they cannot be annotated ClassVar here.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]  # noqa: RUF012
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]  # noqa: RUF012
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "start_all", "Start all"),
        Binding("p", "pick_presets", "Pick presets"),
        Binding("c", "cancel_run", "Cancel run"),
        Binding("e", "export", "Export"),
        Binding("o", "open_session", "Sessions"),
        Binding("t", "probe_cost", "Probe cost"),
        Binding("u", "tune", "Tune"),
        Binding("q", "quit", "Quit"),
        Binding("s", "loss_scope", "Loss: all runs / selected", show=False),
        Binding("l", "loss_kind", "Loss: train / eval", show=False),
        Binding("b", "cost_charts", "Cost bar charts", show=False),
        *(Binding(label[0], f"show_panel('{tab}')", label[2:], show=False) for tab, _, label in PANELS),
    ]

    def __init__(
        self,
        store: ResultsStore,
        *,
        selection: str | None = None,
        overrides: Overrides | None = None,
        worker_cmd: Sequence[str] | None = None,
        cache_dir: Path | str | None = None,
        grace_seconds: float = 5.0,
        clock: Clock = time.monotonic,
        command: str = "vqabench",
        parallel: int = 1,
        tune_trials: int = TUNE_TRIALS,
    ) -> None:
        super().__init__()
        self.store = store
        self.selection = selection or "all"
        self.overrides = overrides or Overrides()
        self.worker_cmd = list(worker_cmd) if worker_cmd else None
        self.cache_dir = cache_dir
        self.grace_seconds = grace_seconds
        self.parallel = parallel
        self.clock = clock
        self.command = command
        self.planned = select_presets(self.selection, self.overrides).specs  # SpecError: before the app opens
        self.view = SessionView.planned(self.planned)
        self.live: SessionView | None = None
        self.runner: Runner | None = None
        self.runner_worker: Worker | None = None
        self.selected: str | None = next(iter(self.view.runs), None)
        self.last_export: Path | None = None
        self._redraw_pending = False
        self._tab_chosen = False
        self._stopping = False
        self._signals: list[int] = []  # SIGTERM/SIGHUP handlers this app installed
        self._terminal_lost = False
        self.probe_worker: Worker | None = None
        self._probe_proc: subprocess.Popen | None = None
        self.tune_trials = tune_trials
        self.tune_worker: Worker | None = None
        self._tuner: Tuner | None = None

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield RunsTable(id="runs")
        yield Static(id="detail")
        yield Tabs(*(Tab(label, id=tab) for tab, _, label in PANELS), id="panel-tabs")
        with Container(id="panels"):
            yield EpochPanel(id="panel-epochs", classes="panel -active")
            yield LossPanel(id="panel-loss", classes="panel")
            yield EfficiencyPanel(id="panel-efficiency", classes="panel")
            yield LogPanel(id="panel-log", classes="panel")
        yield Footer()

    def on_mount(self) -> None:
        for _, panel, label in PANELS:
            self.query_one(f"#{panel}").border_title = label[2:]
        self.query_one("#panel-tabs", Tabs).can_focus = False
        self.query_one(RunsTable).focus()
        self.set_interval(1.0, self._tick)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
                self._signals.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        self._redraw()

    def on_unmount(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)

    # -- runner -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.runner_worker is not None and not self.runner_worker.is_finished

    @property
    def tuning(self) -> bool:
        return self.tune_worker is not None and not self.tune_worker.is_finished

    def start(self, selection: str) -> bool:
        """Validate, record a new session and start its runs; False (with a message) if not."""
        if self.tuning:
            self.notify("Tuning is going: wait for it or quit (q) first.", severity="warning")
            return False
        if self.running:
            self.notify("Runs are going: wait for them or cancel them (c) first.", severity="warning")
            return False
        if self._stopping:
            return False
        try:
            chosen = select_presets(selection, self.overrides)
            gpus = visible_gpus()
            check_launch(chosen.specs, gpus)
        except SpecError as exc:
            self.notify(str(exc), title="Cannot start", severity="error", timeout=15)
            return False
        try:
            session = self.store.begin_session(selection, self.command)
        except StoreError as exc:
            self.notify(str(exc), title="Cannot start", severity="error", timeout=15)
            return False
        specs = chosen.specs
        runner = Runner(
            specs,
            runs_dir=self.store.results_dir / "runs",
            session=session.label,
            worker_cmd=self.worker_cmd,
            cache_dir=self.cache_dir,
            grace_seconds=self.grace_seconds,
            parallel=self.parallel,
            gpus=gpus,
        )
        runner.subscribe(self.store.recorder(session))
        if any(spec.report_to for spec in specs):
            runner.subscribe(SessionTrackers(session.label, self.store.results_dir, self._tracker_warning))
        runner.subscribe(self._on_runner_note)
        self.runner = runner
        self.live = SessionView.planned(runner.specs)
        self.live.session_id, self.live.label, self.live.live = session.id, session.label, True
        self.live.status = RUNNING
        self._show_view(self.live)
        self.query_one(RunsTable).user_moved = False
        self._tab_chosen = False
        self.runner_worker = self.run_worker(runner.run(), name="runner", group="runner", exit_on_error=False)
        added = "".join(
            f" Added {name}: {', '.join(s.name for s in specs if s.after == name)} start(s) from its checkpoint."
            for name in chosen.added
        )
        self.notify(f"Session {session.id}: {len(specs)} run(s) started; results in {self.store.path}.{added}")
        return True

    def _tracker_warning(self, run: str, text: str) -> None:
        """A failed experiment tracker: one warning; the run goes on."""
        self.notify(f"{run}: {text}", title="Tracker", severity="warning", timeout=15)

    def _on_runner_note(self, note: Notification) -> None:
        """Runner subscriber: hand the notification to the app's message queue."""
        self.post_message(notice_for(note))

    def on_runner_notice(self, message: RunnerNotice) -> None:
        if self.live is None:
            return
        note = message.note
        run = self.live.apply(note, self.clock())
        if (
            isinstance(note, RunStatusChanged)
            and note.status == RUNNING
            and self.view is self.live
            and not self.query_one(RunsTable).user_moved
        ):
            self.selected = run  # follow the run in progress until the user picks one
        if isinstance(note, RunnerFinished):
            self._finished(note)
        if self.view is self.live:
            self._schedule_redraw()

    def on_progress_notice(self, message: ProgressNotice) -> None:
        self.on_runner_notice(message)

    def _finished(self, note: RunnerFinished) -> None:
        counts: dict[str, int] = {}
        for status in note.statuses.values():
            counts[status] = counts.get(status, 0) + 1
        text = ", ".join(f"{n} {s}" for s, n in counts.items())
        assert self.live is not None
        self.notify(
            f"Session {self.live.session_id} ended: {text}. Export with e.",
            severity="information" if set(counts) <= {DONE} else "warning",
            timeout=10,
        )
        if not self._tab_chosen:
            self.action_show_panel("tab-efficiency", chosen=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A runner that raised (a bug, not a failed run) is reported instead of hanging."""
        if event.worker is self.runner_worker and event.state == WorkerState.ERROR:
            error = event.worker.error
            self.notify(f"The runner stopped with an error: {error!r}.", severity="error", timeout=30)
            if self.live is not None:
                self.live.live, self.live.status = False, "failed"
            self._schedule_redraw()

    def _on_signal(self, signum: int) -> None:
        """SIGTERM or SIGHUP: quit as `q` does, so that no worker outlives the dashboard."""
        self._terminal_lost = self._terminal_lost or signum == signal.SIGHUP
        self.call_later(self.action_quit)

    def _leave(self) -> None:
        if self._terminal_lost:
            # The terminal hung up: Textual's teardown would block writing to it (seen with
            # tmux kill-session), so leave at once; every store write is already committed.
            self.store.close()
            os._exit(EXIT_HANGUP)
        self.exit(0)

    # -- actions ----------------------------------------------------------------------------

    def action_start_all(self) -> None:
        """Start every run listed when the dashboard opened (the --preset selection, default all)."""
        self.start(self.selection)

    def action_pick_presets(self) -> None:
        if self.running:
            self.notify("Runs are going: wait for them or cancel them (c) first.", severity="warning")
            return
        presets = []
        for name, path in packaged_presets().items():
            try:
                spec = read_preset(path).spec
            except SpecError:
                continue
            presets.append(
                (name, spec.method, spec.description.strip().splitlines()[0] if spec.description.strip() else "")
            )
        chosen = [seed_group(s.name) for s in self.planned]  # "sft@s1" was chosen as "sft"

        def picked(names: list[str] | None) -> None:
            if names is None:
                return
            if not names:
                self.notify("No preset chosen: nothing started.", severity="warning")
                return
            self.start(",".join(names))

        self.push_screen(PresetPicker(presets, chosen, self._overrides_text()), picked)

    def action_cancel_run(self) -> None:
        run = self.view.runs.get(self.selected or "")
        if run is None:
            return
        if self.view is not self.live or self.runner is None or not self.running:
            self.notify(f"{run.name} is not part of a session that is running.", severity="warning")
            return
        if run.status in FINAL_STATUSES:
            self.notify(f"{run.name} is already {run.status}.", severity="warning")
            return
        self.runner.cancel(run.name)
        how = (
            f"stopping its worker (SIGTERM, then SIGKILL after {self.grace_seconds:g} s)"
            if run.status == RUNNING
            else "it will not start"
        )
        self.notify(f"Cancelling {run.name}: {how}.")

    def action_export(self) -> None:
        """Write the Markdown report of the shown session, with its SVG figures, next to the
        results store (the same export as `vqabench export`)."""
        session_id = self.view.session_id
        if session_id is None:
            self.notify("Nothing to export yet: start runs (a) or open a session (o).", severity="warning")
            return
        path = (self.store.results_dir / f"report-session-{session_id}.md").resolve()
        try:
            report = build_report(self.store, session_id)  # the store's connection belongs to this thread
        except StoreError as exc:
            self.notify(f"Cannot write {path} ({exc}).", severity="error", timeout=15)
            return
        self._write_export(report, path)

    @work(thread=True, group="export", exclusive=True)
    def _write_export(self, report: SessionReport, path: Path) -> None:
        """Drawing the figures takes a moment (matplotlib): off the event loop."""
        try:
            written = export_report(report, path)
        except (OSError, FigureError) as exc:
            self.call_from_thread(self.notify, f"Cannot write {path} ({exc}).", severity="error", timeout=15)
            return
        self.call_from_thread(self._exported, written)

    def _exported(self, written: Export) -> None:
        self.last_export = written.path
        figures = f" and {len(written.figures)} SVG figure(s) in {written.path.stem}_files/" if written.figures else ""
        self.notify(f"Wrote {written.path}{figures}", title="Markdown report", timeout=15)
        self._schedule_redraw()

    def action_probe_cost(self) -> None:
        """`vqabench probe` on the current selection: every preset's step, interleaved; shown under Efficiency."""
        if self.running:
            self.notify(
                "Runs are going: probe the step cost when they end (it would disturb both).", severity="warning"
            )
            return
        if self.probe_worker is not None and not self.probe_worker.is_finished:
            self.notify("The cost probe is already running.", severity="warning")
            return
        self.query_one(EfficiencyPanel).show_probe(None, f"Probing the step cost of '{self.selection}'…")
        self.action_show_panel("tab-efficiency")
        self.probe_worker = self._probe()

    @work(thread=True, group="probe", exit_on_error=False)
    def _probe(self) -> None:
        from vqabench.probe import run_probe

        def news(line: str) -> None:
            self.call_from_thread(self.query_one(EfficiencyPanel).show_probe, None, line)

        def started(proc: subprocess.Popen) -> None:
            self._probe_proc = proc

        try:
            outcome = run_probe(
                self.selection,
                self.overrides,
                self.store.results_dir,
                cache_dir=self.cache_dir,
                worker_cmd=self.worker_cmd,
                command=f"{self.command} (dashboard: probe)",
                say=news,
                on_start=started,
            )
        except (SpecError, StoreError) as exc:
            self.call_from_thread(self.notify, str(exc), title="Cannot probe", severity="error", timeout=15)
            return
        self.call_from_thread(self._probe_done, outcome)

    def action_tune(self) -> None:
        """`u`: tune the selection (`vqabench tune`'s core) with this session's settings and the default
        number of trials; its runs show live, and the Tuned table under Efficiency when it ends."""
        if self.running or self.tuning:
            self.notify("Runs are going: tune when they end.", severity="warning")
            return
        if self.probe_worker is not None and not self.probe_worker.is_finished:
            self.notify("The cost probe is running: tune when it ends.", severity="warning")
            return
        self.query_one(EfficiencyPanel).show_tuned(
            None, f"Tuning '{self.selection}', {self.tune_trials} trial(s) each…"
        )
        self.action_show_panel("tab-efficiency", chosen=False)
        self.tune_worker = self._tune()

    @work(thread=True, group="tune", exit_on_error=False)
    def _tune(self) -> None:
        from vqabench.tune.session import tune_session
        from vqabench.tune.study import TuneSettings

        def news(line: str) -> None:
            self.call_from_thread(self.query_one(EfficiencyPanel).show_tuned, None, line)

        def started(session: SessionRecord, tuner: Tuner) -> None:
            self._tuner = tuner
            self.call_from_thread(self._tune_started, session)

        def relay(note: Notification) -> None:
            if not isinstance(note, RunnerFinished):  # one per trial; the session ends with _tune_done
                self.post_message(notice_for(note))

        try:
            result = tune_session(
                self.selection,
                self.overrides,
                self.store.results_dir,
                TuneSettings(trials=self.tune_trials),
                worker_cmd=self.worker_cmd,
                cache_dir=self.cache_dir,
                command=f"{self.command} (dashboard: tune)",
                subscribers=[relay],
                say=news,
                on_start=started,
            )
        except (SpecError, StoreError) as exc:
            self.call_from_thread(self.query_one(EfficiencyPanel).show_tuned, None, "")
            self.call_from_thread(self.notify, str(exc), title="Cannot tune", severity="error", timeout=15)
            return
        self.call_from_thread(self._tune_done, result)

    def _tune_started(self, session: SessionRecord) -> None:
        self.live = SessionView.planned([])  # trials arrive as the tuner queues them
        self.live.session_id, self.live.label, self.live.live = session.id, session.label, True
        self.live.status = RUNNING
        self._show_view(self.live)
        self.query_one(RunsTable).user_moved = False

    def _tune_done(self, result: TuneResult) -> None:
        self._tuner = None
        if self.live is not None and self.live.session_id == result.session_id:
            self.live.live = False
            self.live.status = "cancelled" if result.interrupted else ("done" if result.exit_code == 0 else "failed")
        news = f"Tuning session {result.session_id} ended" + (" (stopped)." if result.interrupted else ".")
        self.query_one(EfficiencyPanel).show_tuned(result.table, news)
        self.notify(
            f"{news} Export with e.", title="Tune", severity="information" if result.exit_code == 0 else "warning"
        )
        self._schedule_redraw()

    def _probe_done(self, outcome: object) -> None:
        from vqabench.probe import ProbeOutcome

        assert isinstance(outcome, ProbeOutcome)
        news = f"The probe failed: {outcome.error}" if outcome.error else f"Stored as session {outcome.session_id}."
        self.query_one(EfficiencyPanel).show_probe(outcome.table, news)
        self.notify(news, title="Step cost probe", severity="error" if outcome.error else "information")

    def action_open_session(self) -> None:
        sessions = self.store.list_sessions()
        counts = {s.id: len(self.store.runs(s.id)) for s in sessions}
        live_id = self.live.session_id if self.live is not None and self.running else None

        def opened(session_id: int | None) -> None:
            if session_id is None:
                return
            if self.live is not None and session_id == self.live.session_id:
                self._show_view(self.live)
                return
            try:
                view = SessionView.from_store(self.store, self.store.session(session_id))
            except StoreError as exc:
                self.notify(str(exc), severity="error")
                return
            self._show_view(view)

        self.push_screen(SessionPicker(sessions, counts, live_id), opened)

    def action_show_panel(self, tab: str, chosen: bool = True) -> None:
        self._tab_chosen = self._tab_chosen or chosen
        self.query_one("#panel-tabs", Tabs).active = tab

    def action_loss_scope(self) -> None:
        """`s`: the loss curves of all runs, or of the selected run alone."""
        panel = self.query_one(LossPanel)
        panel.all_runs = not panel.all_runs
        self._show_panel_of(panel, "tab-loss")

    def action_loss_kind(self) -> None:
        """`l`: train loss or eval loss."""
        panel = self.query_one(LossPanel)
        panel.kind = "eval" if panel.kind == "train" else "train"
        self._show_panel_of(panel, "tab-loss")

    def action_cost_charts(self) -> None:
        """`b`: the efficiency table, then each cost chart in turn."""
        panel = self.query_one(EfficiencyPanel)
        if panel.has_class("-active") or not self.query_one("#panel-tabs", Tabs).display:
            panel.cycle()  # on screen already: go on; else the first press brings it up
        self._show_panel_of(panel, "tab-efficiency")

    def _show_panel_of(self, panel: LossPanel | EfficiencyPanel, tab: str) -> None:
        if not panel.has_class("-active"):
            self.action_show_panel(tab)
        self._schedule_redraw()

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        panel = dict((t, p) for t, p, _ in PANELS).get(event.tab.id or "")
        for _, other, _ in PANELS:
            self.query_one(f"#{other}").set_class(other == panel, "-active")

    async def action_quit(self) -> None:
        """Cancel the runs, wait until no worker is left, then leave."""
        if self._stopping:
            return
        self._stopping = True
        if self._probe_proc is not None and self._probe_proc.poll() is None:
            self._probe_proc.terminate()
        if self.tuning:
            self.notify("Stopping the tuning (its running trial is recorded failed)…", timeout=30)
            self._stop_tuning_then_exit()
        elif self.running:
            self.notify(f"Stopping the runs (SIGTERM, then SIGKILL after {self.grace_seconds:g} s)…", timeout=30)
            self._stop_then_exit()
        else:
            self._leave()

    @work(group="quit")
    async def _stop_then_exit(self) -> None:
        assert self.runner is not None and self.runner_worker is not None
        self.runner.cancel()
        with contextlib.suppress(WorkerCancelled, WorkerFailed):  # reported by on_worker_state_changed
            await self.runner_worker.wait()
        self._leave()

    @work(group="quit")
    async def _stop_tuning_then_exit(self) -> None:
        assert self.tune_worker is not None
        if self._tuner is not None:
            self._tuner.cancel()
        with contextlib.suppress(WorkerCancelled, WorkerFailed):
            await self.tune_worker.wait()
        self._leave()

    # -- drawing ----------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id != "runs" or event.row_key.value is None:
            return
        if event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self._schedule_redraw()

    def _show_view(self, view: SessionView) -> None:
        self.view = view
        if view is not self.live and view.session_id is not None:  # a stored tune session: its Tuned table
            self.query_one(EfficiencyPanel).show_tuned(tuned_table(self.store, view.session_id))
        running = next((n for n, r in view.runs.items() if r.status == RUNNING), None)
        self.selected = running or next(iter(view.runs), None)
        self._schedule_redraw()

    def _schedule_redraw(self) -> None:
        if not self._redraw_pending:
            self._redraw_pending = True
            self.set_timer(REDRAW_DELAY, self._redraw)

    def _tick(self) -> None:
        if any(r.status == RUNNING for r in self.view.runs.values()):
            self.query_one(RunsTable).show(self.view, self.clock(), self.selected)

    def _redraw(self) -> None:
        self._redraw_pending = False
        view, now = self.view, self.clock()
        self.query_one("#title", Static).update(self._title())
        self.query_one(RunsTable).show(view, now, self.selected)
        run = view.runs.get(self.selected or "")
        detail = self.query_one("#detail", Static)
        text = self._detail(run)
        detail.update(text)
        detail.set_class(bool(text), "-shown")
        self.query_one(EpochPanel).show(run)
        self.query_one(LossPanel).show(view, self.selected)
        self.query_one(EfficiencyPanel).show(view)
        self.query_one(LogPanel).show(run)

    def _title(self) -> Text:
        view = self.view
        title = Text("vqabench", "bold")
        if view.session_id is None:
            title.append(f" · {len(view.runs)} run(s) of '{self.selection}' not started{self._overrides_text()}")
        else:
            counts = view.counts()
            order = ("running", "queued", "done", "failed", "skipped", "cancelled")
            tally = ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
            state = "live" if view.live else ("ended" if view is self.live else "from the store")
            title.append(f" · session {view.session_id} ({state}): {tally}")
        if self.last_export is not None:
            title.append(f" · exported {self.last_export.name}")
        return title

    @staticmethod
    def _detail(run: RunView | None) -> str:
        """The selected run's full reason or current message, which the table may cut short."""
        if run is None:
            return ""
        if run.status in FINAL_STATUSES and run.status != DONE and run.reason:
            return f"{run.name} {status_line(run.status, run.reason)}"
        if run.status == RUNNING and run.phase_message:
            return f"{run.name}: {run.phase_message}"
        return ""

    def _overrides_text(self) -> str:
        """The command-line overrides, as flags: ' (--epochs 2 --limit 256)'."""
        o = self.overrides
        parts = [f"--{k} {v}" for k, v in (("epochs", o.epochs), ("limit", o.limit), ("seed", o.seed)) if v is not None]
        if o.seeds:
            parts.append(f"--seeds {','.join(map(str, o.seeds))}")
        parts += [f"--set {item}" for item in o.settings]
        return f" ({' '.join(parts)})" if parts else ""


def run_dashboard(
    *,
    selection: str | None,
    overrides: Overrides,
    results_dir: Path | str,
    worker_cmd: Sequence[str] | None = None,
    cache_dir: Path | str | None = None,
    parallel: int = 1,
) -> int:
    """Open the dashboard on a results folder; returns the exit code once the user quits.

    Raises SpecError for a bad --preset selection and StoreError for an unusable results
    folder before the screen changes, as the headless mode does.
    """
    import shlex
    import sys

    command = shlex.join(["vqabench", *sys.argv[1:]])
    with ResultsStore(results_dir) as store:
        app = Dashboard(
            store,
            selection=selection,
            overrides=overrides,
            worker_cmd=worker_cmd,
            cache_dir=cache_dir,
            command=command,
            parallel=parallel,
        )
        code = app.run()
    return code if isinstance(code, int) else 0
