"""The headless front end: run presets from a terminal or CI, store them, print the comparison.

On a terminal, rich progress bars (one per run: epoch, ETA, running loss) with a line per
finished epoch above them; otherwise one plain line per event, for CI logs. At the end the
quality and efficiency tables of :mod:`vqabench.report` (the same ones ``vqabench export``
writes). Exit code 0 only if every run is done (and, with ``--baseline``, nothing regressed), 1 if one
failed or was skipped (or a figure regressed), 130 after Ctrl-C (or SIGTERM), which cancels the runs
cleanly first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from vqabench.events import EncoderCached, EpochEnded, Evaluated, RunFailed, RunFinished, RunStarted
from vqabench.events import Progress as ProgressEvent
from vqabench.export import export_json, export_report
from vqabench.figures import FigureError, figures_dir
from vqabench.gate import Gate, append_step_summary, apply_gate, verdict_lines
from vqabench.launch import check_launch, visible_gpus
from vqabench.presets import Overrides, select_presets
from vqabench.report import (
    SessionReport,
    build_report,
    data_summary,
    load_disturbed,
    markdown_table,
    reference_text,
    report_markdown,
    run_quality_report,
)
from vqabench.runner import (
    DONE,
    FAILED,
    RUNNING,
    Notification,
    Runner,
    RunQueued,
    RunStatusChanged,
    WorkerEvent,
    WorkerStderr,
    status_line,
)
from vqabench.store import ResultsStore
from vqabench.trackers.session import SessionTrackers

EXIT_OK, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 0, 1, 130
#: In plain mode a progress line is printed when the phase changes or after this long.
PLAIN_PROGRESS_SECONDS = 10.0
STDERR_LINES_ON_FAILURE = 10


def run_headless(
    selection: str,
    overrides: Overrides,
    results_dir: Path | str,
    *,
    export: Path | str | None = None,
    json_path: Path | str | None = None,
    worker_cmd: Sequence[str] | None = None,
    cache_dir: Path | str | None = None,
    console: Console | None = None,
    command: str = "",
    parallel: int = 1,
    figures: bool = True,
    gate: Gate | None = None,
) -> int:
    """Validate, run and store the selected presets; print the comparison; return the exit code.

    With `gate` (a baseline, :func:`vqabench.gate.prepare_gate`), the report gets the Regressions table
    and the exit code is 1 on a statistically real regression too; with $GITHUB_STEP_SUMMARY set, the
    Markdown report is appended to that file.

    Raises SpecError (a bad preset) before anything starts, StoreError for an unusable store.
    """
    chosen = select_presets(selection, overrides)
    gpus = visible_gpus()
    check_launch(chosen.specs, gpus)  # a run that cannot be placed: one sentence, before a session is recorded
    console = console or Console(highlight=False, soft_wrap=True)
    for name in chosen.added:
        dependants = [s.name for s in chosen.specs if s.after == name]
        verb = "starts" if len(dependants) == 1 else "start"
        console.print(f"Added preset {name}: {', '.join(dependants)} {verb} from its checkpoint.")
    with ResultsStore(results_dir) as store:
        session = store.begin_session(selection, command)
        runner = Runner(
            chosen.specs,
            runs_dir=store.results_dir / "runs",
            session=session.label,
            worker_cmd=worker_cmd,
            cache_dir=cache_dir,
            parallel=parallel,
            gpus=gpus,
        )
        runner.subscribe(store.recorder(session))
        console.print(
            f"Session {session.id}: {len(chosen.specs)} run(s): "
            f"{', '.join(s.name for s in chosen.specs)}; results in {store.path}"
        )
        view = ConsoleView(console)
        if any(spec.report_to for spec in chosen.specs):
            runner.subscribe(SessionTrackers(session.label, store.results_dir, view.say_warning))
        runner.subscribe(view)
        with view:
            interrupted = asyncio.run(_run_until_done(runner, console))
        if runner.fatal:
            console.print(f"vqabench: the runs were stopped: {runner.fatal}", markup=False, highlight=False)
        report = build_report(store, session.id)  # once: it reads every run's predictions
        result = apply_gate(gate, report) if gate is not None else None
        _print_summary(console, report, runner)
        export_failed = False
        if result is not None:
            for line in verdict_lines(result):
                console.print(line, markup=False, highlight=False)
            try:
                if append_step_summary(report_markdown(report)) is not None:
                    console.print("Appended the Markdown report to $GITHUB_STEP_SUMMARY.")
            except OSError as exc:
                export_failed = True
                console.print(f"Could not append the report to $GITHUB_STEP_SUMMARY ({exc.strerror}).")
        if export:
            try:
                written = export_report(report, Path(export), figures=figures)
                shown = (
                    f" and {len(written.figures)} SVG figure(s) to {figures_dir(Path(export))}"
                    if written.figures
                    else ""
                )
                console.print(f"Wrote the Markdown report to {export}{shown}.")
            except OSError as exc:
                export_failed = True
                console.print(f"Could not write the Markdown report to {export} ({exc.strerror}).")
            except FigureError as exc:
                export_failed = True
                console.print(f"Could not write the report's figures: {exc}")
        if json_path:
            try:
                export_json(report, json_path)
                console.print(f"Wrote the JSON report to {json_path}.")
            except OSError as exc:
                export_failed = True
                console.print(f"Could not write the JSON report to {json_path} ({exc.strerror}).")
        console.print(
            f"Export it again with: vqabench export --session {session.id} --results {store.results_dir} -o results.md"
        )
    if interrupted:
        return EXIT_INTERRUPTED
    regressed = result is not None and result.failed
    return EXIT_OK if runner.all_done and not export_failed and not regressed else EXIT_RUN_FAILED


async def _run_until_done(runner: Runner, console: Console) -> bool:
    """Run; Ctrl-C or SIGTERM cancels every run. Returns whether the user interrupted."""
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_signal(signum: int) -> None:
        nonlocal interrupted
        if not interrupted:
            console.print(
                f"{signal.Signals(signum).name}: cancelling; stopping the running worker "
                f"(SIGTERM, then SIGKILL after {runner.grace_seconds:g} s)."
            )
        interrupted = True
        runner.cancel()

    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if _add_handler(loop, s, on_signal)]
    try:
        await runner.run()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return interrupted


def _add_handler(loop: asyncio.AbstractEventLoop, signum: int, callback: object) -> bool:
    try:
        loop.add_signal_handler(signum, callback, signum)  # type: ignore[arg-type]
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        return False
    return True


class ConsoleView:
    """Runner subscriber printing events: bars on a terminal, plain lines otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[where]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._steps: dict[str, int] = {}
        self._epochs: dict[str, int] = {}
        self._last_progress: dict[str, tuple[str, int, float]] = {}
        self._stderr: dict[str, list[str]] = {}

    def __enter__(self) -> ConsoleView:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def say(self, run: str, text: str) -> None:
        self.console.print(f"[{run}] {text}", markup=False, highlight=False)

    def say_warning(self, run: str, text: str) -> None:
        self.say(run, f"warning: {text}")

    def __call__(self, note: Notification) -> None:
        if isinstance(note, RunQueued):
            if self.live:
                self._tasks[note.run] = self.progress.add_task(  # an empty bar until run_started
                    note.run, total=1, start=False, where="queued", loss=""
                )
        elif isinstance(note, RunStatusChanged):
            self._status(note)
        elif isinstance(note, WorkerEvent):
            self._event(note.run, note.event)
        elif isinstance(note, WorkerStderr):  # kept for a failure's context
            lines = self._stderr.setdefault(note.run, [])
            lines.append(note.line)
            del lines[:-STDERR_LINES_ON_FAILURE]

    def _status(self, note: RunStatusChanged) -> None:
        if note.status == RUNNING:
            self.say(
                note.run,
                f"running (pid {note.pid}"
                + (f", on {note.device})" if note.device else ")")
                + (f", starting from {note.spec.init_checkpoint}" if note.spec and note.spec.init_checkpoint else ""),
            )
            if self.live:
                self.progress.start_task(self._tasks[note.run])
                self.progress.update(self._tasks[note.run], where="starting")
            return
        self.say(note.run, status_line(note.status, note.reason))
        if note.status == FAILED and self._stderr.get(note.run):
            self.say(note.run, "last log lines of the worker:")
            for line in self._stderr[note.run]:
                self.console.print(f"    {line}", markup=False, highlight=False)
        if self.live and note.run in self._tasks:
            task = self._tasks[note.run]
            self.progress.update(task, where=note.status)
            if note.status == DONE:
                total = next(t.total for t in self.progress.tasks if t.id == task)
                self.progress.update(task, completed=total)
            self.progress.stop_task(task)

    def _event(self, run: str, event: object) -> None:
        task = self._tasks.get(run)
        if isinstance(event, RunStarted):
            self._steps[run] = event.steps_per_epoch
            self._epochs[run] = event.epochs
            reference = reference_text(event)
            self.say(
                run,
                f"started on {event.device}, torch {event.torch_version}: {event.epochs} epochs "
                f"x {event.steps_per_epoch} steps, {event.trainable_params:,} of "
                f"{event.total_params:,} parameters trained, reference: {reference}",
            )
            summary = data_summary(event)
            if summary:
                self.say(run, summary)
            for warning in (run_quality_report(event) or {}).get("warnings") or []:
                self.say(run, f"warning: {warning}")
            if task is not None:
                self.progress.update(
                    task,
                    total=event.epochs * max(event.steps_per_epoch, 1),
                    completed=0,
                    where=f"epoch 0/{event.epochs}",
                )
        elif isinstance(event, ProgressEvent):
            self._progress(run, task, event)
        elif isinstance(event, EncoderCached):
            images = f", {event.images:,} images" if event.images is not None else ""
            size = f"{event.bytes / 2**20:.1f} MiB {event.dtype}, {event.pairs:,} pairs{images}"
            where = f"at {event.path}" if event.path else "in memory"
            if event.built:
                self.say(run, f"encoder cache: encoded once in {event.seconds:.2f} s ({size}) {where}")
            else:
                self.say(run, f"encoder cache: reused ({size}) {where}")
            if event.warning:
                self.say(run, f"warning: {event.warning}")
        elif isinstance(event, EpochEnded):
            memory = (
                f"CUDA peak {event.cuda_max_allocated_mib:.1f} MiB"
                if event.cuda_max_allocated_mib is not None
                else f"peak RSS {event.peak_rss_mib:.1f} MiB"
            )
            scores = ""
            if event.scored_n:
                judge = f", judge {event.judge_score:.3f}" if event.judge_score is not None else ""
                scores = f", eval answers EM {event.em:.3f} F1 {event.f1:.3f}{judge} (n={event.scored_n})"
            step_text = ""
            if event.step_ms_median is not None and event.step_ms_p10 is not None and event.step_ms_p90 is not None:
                step_text = (
                    f" (step {event.step_ms_median:.1f} ms, p10 {event.step_ms_p10:.1f}, p90 {event.step_ms_p90:.1f})"
                )
            self.say(
                run,
                f"epoch {event.epoch}/{event.epochs}: train loss {event.train_loss:.4f}, "
                f"eval loss {event.eval_loss:.4f}, {event.epoch_seconds:.2f} s{step_text}, "
                f"{event.samples_per_s:.1f} samples/s, pref. accuracy {event.pref_accuracy:.3f}, "
                f"{memory}{scores}{' (best)' if event.is_best else ''}",
            )
            if load_disturbed(event.load_avg_max, event.cores):
                self.say(
                    run,
                    f"timing disturbed: the 1-minute load average reached {event.load_avg_max:.1f} on the "
                    f"{event.cores} core(s) this run uses, so other work competed with this epoch.",
                )
            if task is not None:
                steps = self._steps.get(run, 1)
                self.progress.update(task, completed=event.epoch * steps, where=f"epoch {event.epoch}/{event.epochs}")
        elif isinstance(event, Evaluated):
            judge = (
                f", judge {event.judge_score:.3f} ({event.judge}, n={event.judge_n})"
                if event.judge_score is not None
                else ""
            )
            self.say(run, f"{event.split}: EM {event.em:.3f}, F1 {event.f1:.3f}{judge} on {event.n} questions")
        elif isinstance(event, RunFinished):
            self.say(
                run,
                f"finished: best epoch {event.best_epoch} (eval loss {event.best_eval_loss:.4f}), "
                f"{event.train_seconds:.1f} s training, {event.total_seconds:.1f} s in all",
            )
        elif isinstance(event, RunFailed):
            self.say(run, f"reported a failure ({event.error_kind}): {event.message}")

    def _progress(self, run: str, task: TaskID | None, event: ProgressEvent) -> None:
        loss = f"loss {event.running_loss:.4f}" if event.running_loss is not None else ""
        if task is not None:
            if event.phase == "train":
                steps = self._steps.get(run) or event.steps
                self.progress.update(
                    task,
                    completed=(event.epoch - 1) * steps + event.step,
                    where=f"epoch {event.epoch}/{self._epochs.get(run, '?')}",
                    loss=loss,
                )
            else:
                self.progress.update(task, where=f"{event.phase} {event.step}/{event.steps}", loss=loss)
            return
        now = time.monotonic()
        phase, epoch, last = self._last_progress.get(run, ("", -1, 0.0))
        if (event.phase, event.epoch) != (phase, epoch) or now - last >= PLAIN_PROGRESS_SECONDS:
            self._last_progress[run] = (event.phase, event.epoch, now)
            where = f"epoch {event.epoch} " if event.epoch else ""
            self.say(
                run,
                f"{event.phase} {where}step {event.step}/{event.steps}"
                + (f", {loss}" if loss else "")
                + (f": {event.message}" if event.message else ""),
            )


def _print_summary(console: Console, report: SessionReport, runner: Runner) -> None:
    """The quality and efficiency tables, on a terminal with rich, otherwise as Markdown text."""
    console.print()
    for table in report.tables:  # quality and efficiency; per-epoch tables are in the export
        if console.is_terminal:
            rich_table = Table(title=table.title, title_justify="left")
            for column, align in zip(table.columns, table.align, strict=True):  # Text: "[s]" is no markup
                rich_table.add_column(Text(column), justify="right" if align == "right" else "left")
            for row in table.rows:
                rich_table.add_row(*map(Text, row))
            console.print(rich_table)
            for note in table.notes:
                console.print(note, style="dim", markup=False, highlight=False)
        else:
            console.print(f"{table.title}:", markup=False, highlight=False)
            for line in markdown_table(table):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
        console.print()
    if report.unfinished:
        console.print("Runs that did not finish:", markup=False)
        for line in report.unfinished:
            console.print(f"  {line}", markup=False, highlight=False)
    done = sum(1 for s in runner.states.values() if s.status == "done")
    console.print(f"{done} of {len(runner.states)} run(s) done.", markup=False)
